"""What every command's parser shares: one-line argument errors, ``--debug`` and argument types."""
import argparse
import math
import sys
from typing import Callable

__all__ = ['CommandFailed', 'DEBUG_FLAG', 'Parser', 'add_command', 'add_subcommand', 'non_negative_float',
           'non_negative_int', 'positive_float', 'positive_int', 'probability']


class CommandFailed(SystemExit):
    """The end of a failed command: ``code`` is its exit status, ``str()`` its one-line message."""

    def __init__(self, message: str, status: int):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prog>: <what was wrong> (see <prog> --help)``,
    with exit status 2 (the sub-command parsers it makes are of this class too)."""

    def error(self, message: str):
        line = f'{self.prog}: {message} (see {self.prog} --help)'
        print(line, file=sys.stderr, flush=True)
        raise CommandFailed(line, 2)


# --debug on every parser; SUPPRESS keeps a sub-command from resetting a --debug given before it
DEBUG_FLAG = argparse.ArgumentParser(add_help=False)
DEBUG_FLAG.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                        help='show the traceback of a failure (also: environment variable DEFORMVIT_DEBUG=1)')


def add_subcommand(commands, name: str, help: str, description: str = None, **kwargs) -> argparse.ArgumentParser:
    """A sub-command parser with ``--debug``; ``description`` (a module docstring, say) is shown as written."""
    return commands.add_parser(name, help=help, description=description, parents=[DEBUG_FLAG],
                               formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def add_command(commands, name: str, help: str, run: Callable, description: str = None) -> argparse.ArgumentParser:
    """The parser of ``deformvit <name>``, which calls ``run(args)``."""
    parser = add_subcommand(commands, name, help, description)
    parser.set_defaults(func=run, prog=f'deformvit {name}')
    return parser


def _number(kind: type, text: str, accept: Callable[[float], bool], expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f'expected {expected}, got {text}')
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(int, text, lambda v: v >= 1, 'a positive integer')


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(int, text, lambda v: v >= 0, 'an integer >= 0')


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(float, text, lambda v: v > 0, 'a positive number')


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(float, text, lambda v: v >= 0, 'a number >= 0')


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(float, text, lambda v: 0 <= v <= 1, 'a number in [0, 1]')
