"""Errors a user can fix — a wrong flag, path or input — as opposed to bugs.

The CLI prints a :class:`UserError` as one line and exits with status 2; anything else is a
bug and keeps its traceback. The concrete classes also subclass the builtin a caller would
catch (``ValueError``, ``FileNotFoundError``), so library users lose nothing.
"""


class UserError(Exception):
    """Something the user can fix; its message says what and how."""


class UserValueError(UserError, ValueError):
    """A setting or an input that cannot be used."""


class UserFileNotFound(UserError, FileNotFoundError):
    """A path the user gave that does not hold what it should."""


class UserFileExists(UserError, FileExistsError):
    """An output that already holds something the user did not ask to replace."""
