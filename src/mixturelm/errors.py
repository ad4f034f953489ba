"""The one exception type that the command line turns into a one-line message and exit status 2, and the
small checks that raise it."""


class UsageError(ValueError):
    """Bad input from the user: a config value, a path, a checkpoint, a budget.

    The message names the problem and the fix, in one line. The library names config fields
    (`MoEConfig.top_k=9 exceeds ...`); the CLI names its flags. The CLI prints it and exits with 2;
    library callers get a ValueError they can catch.
    """


class TrainingDiverged(UsageError):
    """A non-finite loss or gradient: training stopped before writing anything of the bad step. The
    command line exits with 3."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def positive_ints(obj, *names: str) -> None:
    """Each named field of a config is a positive int, or a UsageError naming the field and the value."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")
