"""The version of deformvit, read in one place: the installed package's metadata (``pyproject.toml``'s
``version``), so that ``deformvit.__version__``, ``deformvit --version`` and ``pip show deformvit``
always agree."""
from importlib.metadata import PackageNotFoundError, version

__all__ = ['__version__']

try:
    __version__ = version('deformvit')
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = '0+unknown'
