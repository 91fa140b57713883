"""``deformvit export``: ONNX or a torch.export program, checked against PyTorch."""
import argparse
import json
import os
from typing import Dict, List, Optional

from ..tasks import LoadedModel, TaskMismatchError, load_model
from ..tools import export
from .common import non_negative_float, non_negative_int, positive_int

__all__ = ['DESCRIPTION', 'add_arguments', 'run']

DESCRIPTION = export.__doc__


def _load(model: str, checkpoint: Optional[str], model_kwargs: Dict) -> LoadedModel:
    """The classifier to export: a registered model (random weights, or ``checkpoint``'s) or a checkpoint file."""
    try:
        return load_model(model, checkpoint, task='classify', **model_kwargs)
    except TaskMismatchError as err:
        raise ValueError(f'{err}; deformvit export writes classification models only, so detection and '
                         'segmentation models are not exportable by this command') from err


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"position_bias": "fixed"}}\', '
                                         f'got {text!r}')
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', metavar='MODEL_OR_CHECKPOINT',
                        help='registered model (dat_tiny, eapt_small, ...) or a checkpoint file')
    parser.add_argument('--checkpoint', help="weights of the named model: 'official' (its official weights, "
                                             'downloaded once), an official release file, a `deformvit convert` '
                                             'output or a classification training checkpoint')
    parser.add_argument('--format', choices=tuple(export.FORMATS), default='onnx',
                        help='onnx (default) or exported-program (torch.export.save, .pt2)')
    parser.add_argument('--output', help='output file (default: MODEL.onnx / MODEL.pt2 in the current folder)')
    parser.add_argument('--opset', type=int, default=export.DEFAULT_OPSET,
                        help=f'ONNX opset, at least {export.MIN_OPSET} (default {export.DEFAULT_OPSET})')
    parser.add_argument('--size', type=positive_int, nargs='+', metavar=('H', 'W'),
                        help="input height [width], fixed in the graph (default: the model's input size)")
    parser.add_argument('--batch', type=positive_int, default=1,
                        help='first batch size checked, and the fixed batch with --static (default 1)')
    parser.add_argument('--static', action='store_true', help='fix the batch axis too')
    parser.add_argument('--no-check', action='store_true', help='write the file without comparing it with PyTorch')
    parser.add_argument('--tolerance', type=non_negative_float, default=export.TOLERANCE,
                        help=f'largest accepted max |diff| to PyTorch (default {export.TOLERANCE:.0e})')
    parser.add_argument('--model-args', type=_json_object, default={}, metavar='JSON',
                        help='timm.create_model arguments as JSON, e.g. \'{"position_bias": "fixed"}\'')
    parser.add_argument('--time', type=non_negative_int, default=0, metavar='RUNS',
                        help='also time PyTorch and the exported file on one image (median of RUNS)')


def _describe(report: export.ExportReport, name: str) -> List[str]:
    shape = ', '.join('batch' if d is None else str(d) for d in report.input_shape)
    kind = f'ONNX opset {report.opset}' if report.format == 'onnx' else 'ExportedProgram'
    lines = [f'{name}: {kind}, input images ({shape}), captured and converted in {report.seconds:.1f} s']
    height, width = report.input_shape[2:]
    lines.append(f'height and width are fixed at {height}x{width}: {report.fixed_spatial}; '
                 'export again with --size for another resolution')
    if report.checks:
        runner = 'onnxruntime (CPU)' if report.format == 'onnx' else 'torch.export.load'
        diffs = ', '.join(f'{c.max_abs_diff:.2e} at {c.shape}' for c in report.checks)
        lines.append(f'check with {runner}: max |diff| to PyTorch {diffs} (tolerance {report.tolerance:.0e})')
        lines.append('other inputs: ' + ', '.join(f'{shape} {"refused" if refused else "ACCEPTED"}'
                                                  for shape, refused in report.refused))
    return lines


def run(args: argparse.Namespace) -> None:
    if args.format == 'onnx':
        export.check_opset(args.opset)
    if args.output:
        export.check_output_path(args.output, args.format)
    loaded = _load(args.model, args.checkpoint, args.model_args)
    model, name = loaded.model, loaded.architecture
    output = args.output or name + export.FORMATS[args.format]
    options = dict(size=args.size, batch=args.batch, static=args.static, check=not args.no_check,
                   tolerance=args.tolerance)
    if args.format == 'onnx':
        report = export.export_onnx(model, output, opset=args.opset, **options)
    else:
        report = export.export_program(model, output, **options)
    print(f"weights: {loaded.weights if loaded.source != name else 'random (no --checkpoint)'}")
    for line in _describe(report, name):
        print(line)
    if not report.written:
        raise ValueError(f'the check failed ({"; ".join(report.failures)}); nothing was written to {output}')
    size_mb = os.path.getsize(output) / 2 ** 20
    print(f'wrote {output} ({size_mb:.1f} MB)' + ('' if report.checks else ' without checking it (--no-check)'))
    if args.time:
        shape = (1, *report.input_shape[1:])
        latency = export.measure_latency(model, output, shape, args.time)
        print(f'latency at {shape}, median of {args.time}: '
              + ', '.join(f'{key} {seconds * 1e3:.1f} ms' for key, seconds in latency.items()))
