"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class LensError(Exception):
    """A problem with the user's input or environment, stated in one line."""
