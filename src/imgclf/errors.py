"""The one exception type imgclf raises for problems a user can fix."""

from __future__ import annotations


class ImgclfError(Exception):
    """A problem with the user's input: the message names the file or field and the fix.

    The CLI prints it as one line and exits with code 2; library callers catch it like any exception.
    """
