"""The errors `slm` reports to users: each message names the file or field and the fix.

The CLI turns any ``SlmError`` into ``error: <message>`` and exit status 2, without a traceback.
"""


class SlmError(Exception):
    """Base class of errors that are the user's to fix (bad input, bad config, bad state)."""


class InputError(SlmError):
    """Bad input data: names the file/column/field and what to do."""


class StageError(SlmError):
    """A pipeline stage cannot run or publish (e.g. unwritable output, stale artifact)."""
