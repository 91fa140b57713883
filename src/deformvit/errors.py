"""The errors deformvit raises for what a user can fix, and the import of optional packages.

:class:`UsageError` is an argument the call cannot take (a non-positive count, an unknown
name, a device that is not there). It is a ``ValueError``, so code that catches ``ValueError``
keeps working; the command line reports it with exit status 2, the status of a bad command line,
and every other failure it reports (unreadable data, a file that does not fit) with status 1.

:func:`optional` imports a package of one of the optional extras (``pip install 'deformvit[train]'``
and the others of ``pyproject.toml``); a missing one is a :class:`MissingExtraError` that names the
``pip install`` line, so that the core (``import deformvit``, ``timm.create_model('dat_tiny')``) needs
none of them.
"""
import difflib
import importlib
import importlib.util
import re
from types import ModuleType
from typing import Iterable, Mapping, Optional

__all__ = ['MissingExtraError', 'UsageError', 'closest', 'optional', 'unknown_model_argument']

# the extra of pyproject.toml that installs each optional package (by its import name)
EXTRAS = {
    'tensorboard': 'train', 'matplotlib': 'train',
    'pycocotools': 'detection', 'scipy': 'detection',
    'segmentation_models_pytorch': 'segmentation',
    'onnx': 'export', 'onnxscript': 'export', 'onnxruntime': 'export',
    'mlxtend': 'demo', 'skimage': 'demo',
}


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


class MissingExtraError(ImportError):
    """An optional package that the work at hand needs is not installed; the message names the ``pip install``."""


def optional(module: str, purpose: str, package: Optional[str] = None, extra: Optional[str] = None) -> ModuleType:
    """Import ``module`` (a dotted name) of an optional extra.

    Args:
        module: what to import, e.g. ``'pycocotools.cocoeval'``.
        purpose: what needs it, for the message (``'COCO evaluation'``).
        package: the optional package behind ``module`` (default: its top-level name; e.g.
            ``'tensorboard'`` for ``torch.utils.tensorboard``), a key of :data:`EXTRAS`.
        extra: the extra to name (default: ``EXTRAS[package]``), for a package that several extras bring.

    Raises:
        MissingExtraError: the package is not installed; the message is one line with the
            ``pip install 'deformvit[extra]'`` that brings it. An installed package that fails to
            import raises its own error.
    """
    package = package or module.split('.')[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if isinstance(err, MissingExtraError) or importlib.util.find_spec(package) is not None:
            raise
        raise MissingExtraError(f"{purpose} needs {package}, which is not installed: pip install "
                                f"'deformvit[{extra or EXTRAS.get(package, 'all')}]'", name=package) from err
