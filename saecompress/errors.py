"""The one exception type for errors a user can cause (bad files, bad arguments), and its helpers."""

from collections.abc import Iterable


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


def check_choice(what: str, value: object, choices: Iterable[object]) -> None:
    """Raise ``SaeCompressError("unknown WHAT 'value'; use one of …")`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise SaeCompressError(f"unknown {what} {value!r}; use one of {', '.join(map(str, choices))}")
