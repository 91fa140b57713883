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

__all__ = ['FAILURES', 'main', 'reported']

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
    demo.register(commands)
    profile.register(commands)
    bench.register(commands)
    visualize.register(commands)
    export.register(commands)
    weights.register(commands)  # convert, count
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Run one ``deformvit`` command line (``sys.argv`` by default)."""
    args = build_parser().parse_args(argv)
    with reported(args.prog):
        args.func(args)


if __name__ == '__main__':
    main(sys.argv[1:])
