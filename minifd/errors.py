"""The one exception type for mistakes a user can make: the CLI prints it as one line and exits 2."""


class MinifdError(Exception):
    """A problem with the user's input (files, flags, hardware) rather than a bug in minifd."""
