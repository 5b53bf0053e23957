"""The one exception type for errors a user can cause (bad files, bad arguments)."""


class SaeCompressError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do.

    The CLI prints it as one line (``error: <message>``) and exits with code 2.
    """
