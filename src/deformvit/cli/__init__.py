"""``deformvit`` command line: ``train``, ``eval``, ``detect``, ``segment``, ``demo``, ``profile``, ``bench``,
``visualize``, ``export``, ``convert``, ``count``.

Each command is a thin layer over the library: it parses its flags, calls the functions of
:mod:`deformvit.training`, :mod:`deformvit.tasks` or :mod:`deformvit.tools` and prints what they
return. Every failure ends as one line on stderr, ``deformvit <command>: <what was wrong>``, with
exit status 2 for an argument the command cannot take (argparse's errors and
:class:`~deformvit.errors.UsageError`), 130 for an interruption and 1 for anything else, and
without a traceback unless ``--debug`` or the environment variable ``DEFORMVIT_DEBUG=1`` asks for
one. :func:`reported` is the one place that turns exceptions into that line.
"""
import argparse
import contextlib
import os
import sys
from typing import Iterator, List, Optional

import torch
import yaml
from PIL import Image

from ..checkpoint import UnsafeCheckpointError
from ..data import DatasetError
from ..errors import MissingExtraError, UsageError
from ..training import TrainingDiverged
from ..version import __version__
from . import bench, demo, dense, export, profile, train, visualize, weights
from .common import DEBUG_FLAG, CommandFailed, Parser, add_command

__all__ = ['CommandFailed', 'FAILURES', 'main', 'reported']

# the tool commands: name -> (help, the module whose add_arguments and run serve it)
TOOLS = {
    'demo': ('classify a photo and show deformed sampling points', demo),
    'profile': ("parameters and MACs per stage; --paper: the papers' tables, measured", profile),
    'bench': ('throughput, latency and peak memory beside timm references; --table8: DAT Table 8 memory', bench),
    'visualize': ("the papers' figures: deformed points, important keys, heat maps, window edges", visualize),
    'export': ('ONNX or torch.export program, checked against PyTorch', export),
}

# failures a user can fix: reported by their message alone
FAILURES = (DatasetError, ValueError, OSError, MissingExtraError, UnsafeCheckpointError, TrainingDiverged,
            yaml.YAMLError, Image.DecompressionBombError)
DEBUG_VARIABLE = 'DEFORMVIT_DEBUG'


def debugging(args: Optional[argparse.Namespace] = None) -> bool:
    """Whether failures show their traceback: ``--debug``, or ``DEFORMVIT_DEBUG`` set to anything but 0."""
    return bool(getattr(args, 'debug', False)) or os.environ.get(DEBUG_VARIABLE, '0') not in ('', '0')


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f'{err.strerror}: {err.filename}'
    if isinstance(err, yaml.YAMLError):
        return f'not valid YAML: {" ".join(str(err).split())}'
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return 'out of device memory; lower --batch-size (or the input size), or use --precision bf16'
    return str(err) or type(err).__name__


@contextlib.contextmanager
def reported(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn an exception inside the block into :class:`CommandFailed`, after writing its one line to stderr.

    Status 2 for a :class:`~deformvit.errors.UsageError`, 130 for ``KeyboardInterrupt``, 1 otherwise;
    an exception outside :data:`FAILURES` is a fault of deformvit and says so. With ``debug`` the
    exception propagates unchanged, traceback and all.
    """
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        if isinstance(err, KeyboardInterrupt):
            message, status = 'interrupted', 130
        elif isinstance(err, UsageError):
            message, status = f'{_describe(err)} (see {prog} --help)', 2
        elif isinstance(err, FAILURES) or isinstance(err, torch.cuda.OutOfMemoryError):
            message, status = _describe(err), 1
        else:
            message, status = (f'unexpected {type(err).__name__}: {_describe(err)}. This is a fault of deformvit, '
                               f'not of your input: rerun with --debug (or {DEBUG_VARIABLE}=1) for the traceback '
                               'and report it'), 1
        line = f'{prog}: {" ".join(message.splitlines())}'
        print(line, file=sys.stderr, flush=True)
        raise CommandFailed(line, status) from err


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog='deformvit', description='Deformable-attention vision transformers.',
                    parents=[DEBUG_FLAG])
    parser.add_argument('--version', action='version', version=f'deformvit {__version__}')
    commands = parser.add_subparsers(dest='command', required=True)
    train.register(commands)  # train, eval
    dense.register(commands)  # detect, segment
    for name, (help, module) in TOOLS.items():
        module.add_arguments(add_command(commands, name, help, module.run, module.DESCRIPTION))
    weights.register(commands)  # convert, count
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Run one ``deformvit`` command line (``sys.argv`` by default); failures end as :func:`reported` says."""
    args = build_parser().parse_args(argv)
    with reported(args.prog, debugging(args)):
        args.func(args)


if __name__ == '__main__':
    main(sys.argv[1:])
