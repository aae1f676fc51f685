"""The errors `slm` reports to users: each message names the file or field and the fix.

The CLI turns any ``SlmError`` into ``error: <message>`` and exit status 2, without a traceback.
"""


class SlmError(Exception):
    """Base class of errors that are the user's to fix (bad input, bad config, bad state)."""


class InputError(SlmError):
    """Bad input data: names the file/column/field and what to do."""


class StageError(SlmError):
    """A pipeline stage cannot run or publish (e.g. unwritable output, stale artifact)."""


def user_error(e: BaseException | None) -> SlmError | None:
    """The ``SlmError`` behind a Ray failure (a Train worker's or Tune trial's exception is
    wrapped in ``RayTaskError``/``TrainingFailedError``/worker-failure maps), if there is one."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, SlmError):
            return x
        stack.extend([x.__cause__, x.__context__, getattr(x, "cause", None)])
        stack.extend(getattr(x, "worker_failures", {}).values())
    return None


def reraise_user_error(e: BaseException) -> None:
    """Raise the user's error behind a Ray failure as itself (no Ray traceback), if any."""
    user = user_error(e)
    if user is not None:
        raise type(user)(str(user)) from None
