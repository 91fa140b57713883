"""The errors deformvit raises for what a user can fix.

:class:`UsageError` is an argument the call cannot take (a non-positive count, an unknown
name, a device that is not there). It is a ``ValueError``, so code that catches ``ValueError``
keeps working; the command line reports it with exit status 2, the status of a bad command line,
and every other failure it reports (unreadable data, a file that does not fit) with status 1.
"""
import difflib
import re
from typing import Iterable, Mapping, Optional

__all__ = ['UsageError', 'closest', 'unknown_model_argument']


class UsageError(ValueError):
    """An argument that cannot be taken: what was given, what is expected."""


def closest(name: str, known: Iterable[str], n: int = 3) -> str:
    """``'; did you mean a, b?'`` naming the entries of ``known`` closest to ``name``, or ``''``."""
    close = difflib.get_close_matches(name, list(known), n=n)
    return f'; did you mean {", ".join(close)}?' if close else ''


def unknown_model_argument(model: str, error: TypeError, given: Mapping, field: str) -> Optional[UsageError]:
    """The UsageError for ``error``, a model constructor's complaint about an unexpected keyword argument that is
    among ``given`` (the user's ``field``), or None when ``error`` is another fault."""
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if unknown is None or unknown.group(1) not in given:
        return None
    name = unknown.group(1)
    return UsageError(f'{field}: {model} takes no argument {name!r} (given {name}={given[name]!r}); expected '
                      f'arguments of its model class, e.g. {field}: {{drop_path_rate: 0.1}}')
