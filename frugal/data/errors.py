"""The one error type of frugal.data."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data set is missing, corrupt or malformed. The message says what is wrong and which command
    (or call) fixes it, e.g. "mnist is not cached in /x; run `frugal data fetch mnist`"."""
