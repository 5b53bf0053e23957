"""The one exception type for errors a user can cause (bad files, bad arguments)."""


class SaeCompressError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do.

    The CLI prints it as one line (``error: <message>``) and exits with code 2.
    """


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s message, or its type name when the message is blank."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
