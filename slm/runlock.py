"""One writer per run directory: every command that writes a run holds its lock.

Two writers on one run would delete each other's staging directories and could publish an
artifact built from the other's half-written inputs. The lock names its holder (host, PID,
command, start time), so the second writer's error says who has it.

* Local run directory: ``RUN/.slm-lock``, held with ``flock`` while the command runs. The
  kernel drops it when the holder dies (even by SIGKILL), so a stale local lock cannot exist.
* Object storage (no locks there): a lock object ``RUN/.slm-lock.json`` with the holder and a
  heartbeat the holder rewrites every ``HEARTBEAT_S``. A lock is *stale* when its heartbeat is
  older than ``STALE_S``, or when its holder is a process of this host that no longer exists; a
  stale lock is taken over with a warning. Taking it is write-then-read-back after a pause
  (object stores give read-after-write consistency, not compare-and-swap), so of two writers
  racing for a free lock, the one whose write landed last keeps it and the other is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator

from slm.errors import StageError
from slm.stage import exists, is_remote, join, read_json, remove, write_json

LOCAL_LOCK = ".slm-lock"
REMOTE_LOCK = ".slm-lock.json"
HEARTBEAT_S = 15.0
STALE_S = 90.0
SETTLE_S = 1.0  # between writing the lock object and reading it back


def _holder(command: str) -> dict[str, Any]:
    now = time.time()
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "command": command, "started": now, "heartbeat": now}


def _describe(h: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.get("started", 0)))
    return f"`{h.get('command', '?')}` (pid {h.get('pid', '?')} on {h.get('host', '?')}, since {started})"


def _refused(run: str, h: dict[str, Any]) -> StageError:
    return StageError(f"run '{run}' is being written by {_describe(h)}; one command writes a run "
                      "at a time: wait for it to finish (or stop it), or use another run_dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(h: dict[str, Any], now: float | None = None) -> bool:
    """A lock object whose holder stopped: no heartbeat for STALE_S, or a dead PID of this host."""
    now = time.time() if now is None else now
    if now - float(h.get("heartbeat", 0)) > STALE_S:
        return True
    return h.get("host") == socket.gethostname() and not _pid_alive(int(h.get("pid", -1)))


@contextlib.contextmanager
def run_lock(run: str, command: str, create: bool = True) -> Iterator[dict[str, Any] | None]:
    """Hold the run's lock for the block; StageError naming the holder when another has it.
    ``create=False`` (a command on an existing run): a run that does not exist is left
    uncreated and unlocked (yields None), for the command to report it missing."""
    if not create and not exists(run):
        yield None
    elif is_remote(run):
        with _remote_lock(run, command) as h:
            yield h
    else:
        with _local_lock(run, command) as h:
            yield h


@contextlib.contextmanager
def _local_lock(run: str, command: str) -> Iterator[dict[str, Any]]:
    try:
        os.makedirs(run, exist_ok=True)
        f = open(os.path.join(run, LOCAL_LOCK), "a+")
    except OSError as e:
        raise StageError(f"cannot create the run directory '{run}' or its lock: {e.strerror}. "
                         "Choose a writable run_dir (--run_dir PATH)") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                held = json.loads(f.read() or "{}")
            except ValueError:
                held = {}
            raise _refused(run, held) from None
        h = _holder(command)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(h))
        f.flush()
        try:
            yield h
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(uri: str) -> dict[str, Any] | None:
    try:
        return read_json(uri)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {} if exists(uri) else None  # unreadable: treated as a stale lock


@contextlib.contextmanager
def _remote_lock(run: str, command: str) -> Iterator[dict[str, Any]]:
    uri = join(run, REMOTE_LOCK)
    held = _read(uri)
    if held is not None:
        if not is_stale(held):
            raise _refused(run, held)
        print(f"warning: taking over the stale lock of run '{run}' held by {_describe(held)} "
              f"(no heartbeat for {time.time() - float(held.get('heartbeat', 0)):.0f} s or its "
              "process is gone)", file=sys.stderr, flush=True)
    h = _holder(command)
    write_json(uri, h)
    time.sleep(SETTLE_S)
    now = _read(uri)
    if not now or now.get("owner") != h["owner"]:
        raise _refused(run, now or {})
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(uri, h, stop), daemon=True,
                            name="slm-run-lock")
    beat.start()
    try:
        yield h
    finally:
        stop.set()
        beat.join(timeout=10)
        with contextlib.suppress(OSError):
            mine = _read(uri)
            if mine and mine.get("owner") == h["owner"]:  # never delete another writer's lock
                remove(uri)


def _heartbeat(uri: str, h: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            now = _read(uri)
            if not now or now.get("owner") != h["owner"]:
                print(f"warning: the lock '{uri}' was taken over by "
                      f"{_describe(now or {})}; this command no longer holds the run",
                      file=sys.stderr, flush=True)
                return
            write_json(uri, {**h, "heartbeat": time.time()})
        except OSError:  # the store is down for a moment: the next beat tries again
            continue


def lock_path(run: str) -> str:
    """The lock's file/object (for messages and tests)."""
    return join(run, REMOTE_LOCK if is_remote(run) else LOCAL_LOCK)

