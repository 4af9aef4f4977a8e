"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class LensError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 2  # what the CLI exits with (docs/running.md "What a run prints")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def one_line(exc: BaseException) -> str:
    """An exception as one line for a user: its type and the first line of its text."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
