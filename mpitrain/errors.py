"""The one exception type for mistakes a user can make.

A UserError reaching the command line is printed as a single line on stderr and the process
exits with status 2 (no traceback). Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: bad option, missing or damaged file, data that does not fit."""

    from mpitrain.exits import USAGE as exit_code
