"""``deformvit profile``: parameters and MACs per stage; ``--paper``: the papers' tables, measured."""
import argparse
import pathlib
from typing import List, Optional, Tuple

import torch.nn as nn

from ..checkpoint import check_output_file, write_atomically
from ..errors import UsageError
from ..tasks import create_model
from ..tools import profile
from ..tools.complexity import CONVENTIONS
from .common import positive_int

__all__ = ['DESCRIPTION', 'add_arguments', 'run']

DESCRIPTION = profile.__doc__


def _size(values: Optional[List[int]], model: nn.Module) -> Tuple[int, int, int]:
    if not values:
        return tuple(model.pretrained_cfg['input_size']) if hasattr(model, 'pretrained_cfg') else (3, 224, 224)
    if len(values) > 2 or min(values) < 1:
        raise ValueError(f'--size takes one or two positive integers (H [W]), got {values}')
    height, width = values[0], values[-1]
    return (getattr(model, 'in_chans', 3), height, width)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('models', nargs='*', metavar='MODEL', help='registered model names (ours or any timm model)')
    parser.add_argument('--size', type=positive_int, nargs='+', metavar='H [W]',
                        help="input size (default: the model's)")
    parser.add_argument('--depth', type=positive_int, default=1,
                        help='1: stages; 2: blocks; 3: inside blocks (default 1)')
    parser.add_argument('--convention', choices=sorted(CONVENTIONS), default='fvcore', help='MAC convention')
    parser.add_argument('--paper', action='store_true',
                        help='measure every paper row deformvit builds and write them as markdown')
    parser.add_argument('--table', action='append', metavar='TABLE',
                        help='with --paper: only this table, e.g. "Table 6" or "DAT Table 6" (repeatable; prints only)')
    parser.add_argument('--output', metavar='PATH',
                        help=f'with --paper: markdown file to write (default: {profile.PAPER_TABLES_PATH} for all '
                             'tables)')


def run(args: argparse.Namespace) -> None:
    if args.paper:
        if args.models:
            raise UsageError('--paper measures the papers\' rows; give either --paper or model names')
        output = args.output or (None if args.table else profile.PAPER_TABLES_PATH)
        if output:
            check_output_file(output, ('.md',), 'markdown')
        rows = profile.select_rows(args.table)
        results = profile.measure_rows(rows, progress=lambda line: print(line, flush=True))
        text = profile.paper_markdown(results)
        print(text)
        if output:
            write_atomically(output, lambda tmp: pathlib.Path(tmp).write_text(text))
            print(f'wrote {output}')
        return
    if not args.models:
        raise UsageError('name at least one model (e.g. dat_tiny), or use --paper')
    if args.output or args.table:
        raise UsageError('--output and --table go with --paper; without it the profile is printed')
    for name in args.models:
        model = create_model(name)
        input_size = _size(args.size, model)
        parts, params, macs = profile.module_profile(model, input_size, args.depth, args.convention)
        print(profile.profile_markdown(name, parts, params, macs, input_size, args.convention) + '\n')
