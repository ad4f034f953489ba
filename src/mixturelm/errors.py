"""The one exception type that the command line turns into a one-line message and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: a config value, a path, a checkpoint, a budget.

    The message names the problem and the fix, in one line. The CLI prints it and exits with 2;
    library callers get a ValueError they can catch.
    """
