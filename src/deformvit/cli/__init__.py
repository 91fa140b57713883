"""``deformvit`` command line: ``train``, ``eval``, ``detect``, ``segment``, ``demo``, ``profile``, ``bench``,
``visualize``, ``export``, ``convert``, ``count``.

Each command is a thin layer over the library: it parses its flags, calls the functions of
:mod:`deformvit.training`, :mod:`deformvit.tasks` or :mod:`deformvit.tools` and prints what they
return. Failures the user can fix (bad data, files, arguments) end as one line on stderr,
``deformvit <command>: <what was wrong>``, with exit status 1; :func:`reported` is the one place
that turns them into that line.
"""
import argparse
import contextlib
import sys
from typing import Iterator, List, Optional

from ..checkpoint import UnsafeCheckpointError
from ..data import DatasetError
from ..training import TrainingDiverged
from . import bench, demo, dense, export, profile, train, visualize, weights
from .common import add_command

__all__ = ['FAILURES', 'main', 'reported']

# the tool commands: name -> (help, the module whose add_arguments and run serve it)
TOOLS = {
    'demo': ('classify a photo and show deformed sampling points', demo),
    'profile': ("parameters and MACs per stage; --paper: the papers' tables, measured", profile),
    'bench': ('throughput, latency and peak memory beside timm references; --table8: DAT Table 8 memory', bench),
    'visualize': ("the papers' figures: deformed points, important keys, heat maps, window edges", visualize),
    'export': ('ONNX or torch.export program, checked against PyTorch', export),
}

# failures a user can fix: reported as one line, without a traceback
FAILURES = (DatasetError, ValueError, FileNotFoundError, FileExistsError, UnsafeCheckpointError, TrainingDiverged)


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Turn a failure of :data:`FAILURES` inside the block into ``SystemExit('<prog>: <message>')`` (status 1)."""
    try:
        yield
    except FAILURES as err:
        raise SystemExit(f'{prog}: {err}') from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='deformvit', description='Deformable-attention vision transformers.')
    commands = parser.add_subparsers(dest='command', required=True)
    train.register(commands)  # train, eval
    dense.register(commands)  # detect, segment
    for name, (help, module) in TOOLS.items():
        module.add_arguments(add_command(commands, name, help, module.run, module.DESCRIPTION))
    weights.register(commands)  # convert, count
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Run one ``deformvit`` command line (``sys.argv`` by default)."""
    args = build_parser().parse_args(argv)
    with reported(args.prog):
        args.func(args)


if __name__ == '__main__':
    main(sys.argv[1:])
