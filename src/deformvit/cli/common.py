"""What every command's parser shares."""
import argparse
from typing import Callable

__all__ = ['add_command']


def add_command(commands, name: str, help: str, run: Callable, description: str = None) -> argparse.ArgumentParser:
    """The parser of ``deformvit <name>``, which calls ``run(args)``; ``description`` (a module docstring, say)
    is shown as written by ``--help``."""
    parser = commands.add_parser(name, help=help, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, prog=f'deformvit {name}')
    return parser
