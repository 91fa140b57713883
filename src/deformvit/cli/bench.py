"""``deformvit bench``: throughput, latency and peak memory beside timm references."""
import argparse
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..runtime import PRECISIONS
from ..tasks import DETECTORS
from ..tools import bench
from .common import non_negative_int, positive_int

__all__ = ['DESCRIPTION', 'add_arguments', 'run']

DESCRIPTION = bench.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--models', nargs='+', default=list(bench.DEFAULT_MODELS), metavar='NAME',
                        help=f'models to measure, any timm name (default: {" ".join(bench.DEFAULT_MODELS)})')
    parser.add_argument('--references', nargs='+', default=list(bench.DEFAULT_REFERENCES), metavar='NAME',
                        help='timm reference models measured in the same run, or "none" '
                             f'(default: {" ".join(bench.DEFAULT_REFERENCES)})')
    parser.add_argument('--ratio-to', metavar='NAME',
                        help=f'model the ratio columns divide by (default: {bench.SWIN_T} when measured)')
    parser.add_argument('--device', help='cpu, cuda[:N] or meta (memory only); default: cuda if available, '
                                         'else cpu (--table8: else meta)')
    parser.add_argument('--precision', nargs='+', default=['fp32'], choices=list(PRECISIONS),
                        help='fp32, and/or bf16 / fp16 under autocast (default: fp32)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the models (compile time reported apart)')
    parser.add_argument('--mode', choices=('infer', 'train', 'both'), default='infer',
                        help='infer: forward pass; train: forward, backward and AdamW step (default: infer)')
    parser.add_argument('--batch', type=positive_int, help='images per batch (default: 16; --table8: 64)')
    parser.add_argument('--size', type=positive_int, default=224, help='input side (default: 224)')
    parser.add_argument('--threads', type=positive_int, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--warmup', type=non_negative_int, help='untimed rounds (default: 3; --detectors: 1)')
    parser.add_argument('--repeats', type=positive_int,
                        help='timed rounds; medians over them (default: 10; --detectors: 5)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory pass')
    parser.add_argument('--table8', action='store_true',
                        help='measure the memory column of DAT Table 8 (D-DETR vs DAT attention) instead')
    parser.add_argument('--detectors', nargs='+', choices=list(DETECTORS), metavar='NAME',
                        help='time whole detectors (inference, EAPT Table IV\'s FPS) instead: '
                             f'{", ".join(DETECTORS)}')
    parser.add_argument('--backbones', nargs='+', default=list(bench.DETECTION_BACKBONES), metavar='NAME',
                        help='backbones of --detectors; ratios to the first '
                             f'(default: {" ".join(bench.DETECTION_BACKBONES)})')
    parser.add_argument('--image-size', nargs=2, type=positive_int, default=list(bench.DETECTION_SIZE),
                        metavar=('HEIGHT', 'WIDTH'), help='image of --detectors (default: 800 1280)')
    parser.add_argument('--csv', metavar='PATH', help='also write the rows as CSV')
    parser.add_argument('--markdown', metavar='PATH', help='also write the table as markdown')


def _model_list(args: argparse.Namespace) -> List[str]:
    references = [] if [r.lower() for r in args.references] == ['none'] else args.references
    names = []
    for name in [*args.models, *references]:
        if name not in names:
            names.append(name)
    return names


def _write(args: argparse.Namespace, rows: Sequence[Dict], markdown: str) -> None:
    print(markdown, end='')
    if args.csv:
        bench.write_csv(rows, args.csv)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(markdown)


def run(args: argparse.Namespace, extra_models: Optional[Mapping[str, nn.Module]] = None) -> List[Dict]:
    """Run ``deformvit bench``; ``extra_models`` (label -> module) are measured before the named ones."""
    if args.detectors:
        if args.table8 or args.compile or args.mode != 'infer' or len(args.precision) > 1:
            raise ValueError('--detectors times inference at one --precision, without --table8, --compile or '
                             '--mode train')
        rows = bench.detection_benchmark(
            args.detectors, args.backbones, tuple(args.image_size), batch=args.batch or 1, device=args.device,
            precision=args.precision[0], warmup=1 if args.warmup is None else args.warmup,
            repeats=args.repeats or 5, threads=args.threads)
        _write(args, rows, bench.format_detection_markdown(rows))
        return rows
    if args.table8:
        if len(args.precision) > 1 or args.compile:
            raise ValueError('--table8 measures memory, at one --precision, without --compile')
        device = args.device or ('cuda' if torch.cuda.is_available() else 'meta')
        with bench.torch_threads(args.threads):
            results = bench.table8_memory(bench.DAT_TABLE8_ROWS, batch=args.batch or bench.TABLE8_BATCH,
                                          size=args.size, device=device, precision=args.precision[0])
        rows = [dict(r, kwargs=repr(r['kwargs'])) for r in results]
        _write(args, rows, bench.format_table8_markdown(results))
        return rows
    models = dict(extra_models or {})
    models.update((name, name) for name in _model_list(args))
    reference = args.ratio_to or (bench.SWIN_T if bench.SWIN_T in models else None)
    modes = bench.MODES if args.mode == 'both' else (args.mode,)
    rows = bench.benchmark(
        models, batch=args.batch or 16, size=args.size, device=args.device, precisions=args.precision,
        modes=modes, compile_models=args.compile, warmup=3 if args.warmup is None else args.warmup,
        repeats=args.repeats or 10,
        threads=args.threads, reference=reference, memory=not args.no_memory)
    _write(args, rows, bench.format_markdown(rows))
    return rows
