"""The one exception type for mistakes a user can make: the CLI prints it as one line and exits 2."""


class MinifdError(Exception):
    """A problem with the user's input (files, flags, hardware) rather than a bug in minifd.

    parameter: the Python parameter the message names, as Python spells it (`top_k`), or None; the
    CLI writes the message with the flag that sets it (`--top-k`) instead.
    """

    def __init__(self, message, parameter=None):
        super().__init__(message)
        self.parameter = parameter
