"""The one exception type imgclf raises for problems a user can fix."""

from __future__ import annotations


class ImgclfError(Exception):
    """A problem with the user's input: the message names the file or field and the fix.

    The CLI prints it as one line and exits with ``exit_code`` (2; a subclass may say otherwise, e.g. 3 for a
    retrained model that ran but is not promoted); library callers catch it like any exception.
    """

    exit_code: int = 2


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of ``e``'s message (its type's name when empty), cut to ``limit`` characters: how a
    library's multi-line exception becomes part of a one-line ``ImgclfError``."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
