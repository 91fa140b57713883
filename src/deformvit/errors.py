"""The errors deformvit raises for what a user can fix.

:class:`UsageError` is an argument the call cannot take (a non-positive count, an unknown
name, a device that is not there). It is a ``ValueError``, so code that catches ``ValueError``
keeps working; the command line reports it with exit status 2, the status of a bad command line,
and every other failure it reports (unreadable data, a file that does not fit) with status 1.
"""
import difflib
from typing import Iterable

__all__ = ['UsageError', 'closest']


class UsageError(ValueError):
    """An argument that cannot be taken: what was given, what is expected."""


def closest(name: str, known: Iterable[str], n: int = 3) -> str:
    """``'; did you mean a, b?'`` naming the entries of ``known`` closest to ``name``, or ``''``."""
    close = difflib.get_close_matches(name, list(known), n=n)
    return f'; did you mean {", ".join(close)}?' if close else ''
