"""Side counts of a streamed stage (documents skipped, tokens seen) without collecting rows.

A Ray Data pipeline only returns its rows; counts that do not appear in the output (a skipped
non-UTF-8 file, the tokens of a tail dropped after the last window) are reported by the tasks to
one small actor. Errors meant for the user go the same way: Ray wraps an exception raised in a
task into its own types and keeps only its text, so a task records its ``InputError`` here
before raising, and the driver re-raises that clean error. Counts are *keyed* (by file), so a task that Ray retries overwrites its own
entry instead of adding twice.
"""

from __future__ import annotations

from typing import Any

import ray

from slm.configkit import ConfigError
from slm.errors import InputError, SlmError, StageError


@ray.remote(num_cpus=0)
class KeyedCounter:
    """``set(key, **values)`` from tasks; ``totals()`` on the driver."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, int]] = {}
        self._errors: list[tuple[str, str, str]] = []

    def error(self, key: str, kind: str, message: str) -> None:
        self._errors.append((key, kind, message))

    def first_error(self) -> tuple[str, str] | None:
        """(kind, message) of the error of the first key in name order (deterministic)."""
        if not self._errors:
            return None
        _, kind, message = min(self._errors)
        return kind, message

    def set(self, key: str, **values: int) -> None:
        self._entries[key] = values

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for values in self._entries.values():
            for name, v in values.items():
                out[name] = out.get(name, 0) + int(v)
        return out

    def keys_with(self, name: str, limit: int = 20) -> list[str]:
        """Keys whose entry has a non-zero ``name`` (e.g. the files that were skipped)."""
        return sorted(k for k, v in self._entries.items() if v.get(name))[:limit]


def new_counter():
    """A fresh counter actor (lives as long as the driver holds the handle)."""
    return KeyedCounter.remote()


def report(counter, key: str, **values: int) -> None:
    """From inside a task: record ``values`` for ``key`` (idempotent under retries)."""
    if counter is not None:
        ray.get(counter.set.remote(key, **values))


def fail(counter, key: str, err: SlmError) -> None:
    """From inside a task: record a user-facing error, then raise it (stops the pipeline)."""
    if counter is not None:
        ray.get(counter.error.remote(key, type(err).__name__, str(err)))
    raise err


def recorded_error(counter) -> SlmError | None:
    """The user-facing error a task recorded, rebuilt as its slm type, or None."""
    if counter is None:
        return None
    found = ray.get(counter.first_error.remote())
    if found is None:
        return None
    kind, message = found
    cls = {"InputError": InputError, "StageError": StageError, "ConfigError": ConfigError}.get(kind, SlmError)
    return cls(message)
