"""deformvit export: write a classification model as ONNX or as a torch.export program, checked.

MODEL_OR_CHECKPOINT is a registered model name (dat_nano, dat_tiny, ..., eapt_nano,
eapt_small, ...), with weights from --checkpoint (an official DAT release file, a file written
by `deformvit convert` or a deformvit classification training checkpoint), or such a
checkpoint file alone. Without weights the model is randomly initialised.

The forward pass is captured once with torch.export (non-strict) and written as ONNX (the
torch.onnx dynamo exporter, opset 18 by default, opset 17 rewritten from 18, one
self-contained file) or as an ExportedProgram saved with torch.export.save (.pt2). The batch
axis is dynamic (--static fixes it); height and width are fixed at --size (default: the
model's input size), because DAT and EAPT compute window padding, shift and padding masks,
window counts, reference grids and resampled position tables from the input size in Python:
export once per resolution. Inputs of another size are refused by onnxruntime and by the
loaded program, never silently computed.

The written file is checked against the PyTorch model on random images at two batch sizes
(one with --static): the maximum absolute difference of the outputs must stay below 1e-4
(fp32), and an input of another size must be refused. The command prints the differences and
exits with status 1 when the check fails; the file is written to a temporary name, checked,
and renamed into place only when it passes, so a failed or interrupted export leaves no file.

Examples:
  deformvit export dat_tiny --checkpoint dat_tiny_in1k.pth --size 224
  deformvit export runs/digits/best.safetensors --output digits.onnx
  deformvit export eapt_small --format exported-program --output eapt_small.pt2
"""
import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from torch.export import Dim

from .checkpoint import UnsafeCheckpointError, write_atomically
from .models._pyramid import PyramidBackbone
from .tasks import TaskMismatchError, load_classifier

__all__ = [
    'DEFAULT_OPSET', 'FORMATS', 'MIN_OPSET', 'TOLERANCE', 'ExportReport', 'OutputCheck', 'add_arguments', 'capture',
    'export_onnx', 'export_program', 'fixed_spatial_reason', 'load_model', 'main', 'measure_latency', 'model_names',
]

MIN_OPSET = 17
DEFAULT_OPSET = 18
EXPORTER_OPSET = 18  # the oldest opset torch.onnx translates to; opset 17 is rewritten from it
TOLERANCE = 1e-4  # maximum absolute difference to the PyTorch outputs (fp32)
FORMATS = {'onnx': '.onnx', 'exported-program': '.pt2'}

# Why height and width are fixed in the exported graph, per family.
_FIXED_SPATIAL = {
    'DAT': 'DAT computes window padding, shift-window masks, window counts, the reference and query grids of '
           'deformable attention and resampled position tables from the input size',
    'EAPT': 'EAPT computes the window geometry (padding, window counts, padding masks), the position encoding '
            'of the map, the clamp limits of the deformed positions and the En-DeC padding from the input size',
}


@dataclass
class OutputCheck:
    """Largest absolute difference between the file's outputs and PyTorch's on one input shape."""
    shape: Tuple[int, ...]
    max_abs_diff: float


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_program` wrote and how it compared with PyTorch.

    Attributes:
        path: the output file (present only when ``written``).
        format: ``'onnx'`` or ``'exported-program'``.
        input_shape: ``(B, C, H, W)`` of the file's input, None for a dynamic axis.
        fixed_spatial: why height and width are fixed (see :func:`fixed_spatial_reason`).
        opset: ONNX opset (None for an ExportedProgram).
        checks: one :class:`OutputCheck` per checked input shape (empty with ``check=False``).
        refused: ``(shape, refused)`` for inputs the file must refuse (another size, and another
            batch when the batch is fixed): True when running it raised an error.
        tolerance: the largest accepted difference.
        seconds: time spent capturing and converting the graph (checks excluded).
        written: the file was written (the check passed, or was skipped).
    """
    path: str
    format: str
    input_shape: Tuple[Optional[int], ...]
    fixed_spatial: str
    opset: Optional[int] = None
    checks: List[OutputCheck] = field(default_factory=list)
    refused: List[Tuple[Tuple[int, ...], bool]] = field(default_factory=list)
    tolerance: float = TOLERANCE
    seconds: float = 0.
    written: bool = False

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float('nan'))

    @property
    def failures(self) -> List[str]:
        """What made the check fail, in words (empty when it passed or did not run)."""
        failures = [f'max |diff| {c.max_abs_diff:.2e} at {c.shape} is not below {self.tolerance:.0e}'
                    for c in self.checks if not c.max_abs_diff < self.tolerance]
        return failures + [f'an input of shape {shape} was accepted' for shape, refused in self.refused if not refused]

    @property
    def passed(self) -> bool:
        """Every checked difference is below ``tolerance`` and every other-size input was refused."""
        return (bool(self.checks) and all(c.max_abs_diff < self.tolerance for c in self.checks)
                and all(refused for _, refused in self.refused))


def model_names() -> List[str]:
    """The registered DAT and EAPT models."""
    return timm.list_models(module=['dat', 'eapt'])


def _backbone(model: nn.Module) -> nn.Module:
    """The DAT / EAPT inside ``model`` (a ``features_only`` wrapper holds it as ``model.model``)."""
    inner = getattr(model, 'model', model)
    if not isinstance(inner, PyramidBackbone) or type(inner).__name__ not in _FIXED_SPATIAL:
        raise ValueError(f'cannot export a {type(model).__name__}: expected a DAT or EAPT model '
                         f'({", ".join(model_names())})')
    return inner


def fixed_spatial_reason(model: nn.Module) -> str:
    """Why the exported graph of ``model`` has a fixed height and width (DAT or EAPT)."""
    return _FIXED_SPATIAL[type(_backbone(model)).__name__]


def load_model(model_or_checkpoint: str, checkpoint: Optional[str] = None, **model_kwargs) -> Tuple[nn.Module, str]:
    """The eval-mode classification model named or stored by ``model_or_checkpoint``.

    Args:
        model_or_checkpoint: a registered model (:func:`model_names`) or a checkpoint file: a
            deformvit classification training checkpoint or a ``deformvit convert`` output
            (``.safetensors`` recording the architecture), or an official DAT release file
            (the variant is inferred from the weights).
        checkpoint: weights of a named model, any of the kinds above; None: random weights.
        **model_kwargs: ``timm.create_model`` arguments (ablations, ``num_classes``,
            ``features_only``...); not allowed with a training checkpoint, which records its own.

    Returns:
        ``(model, architecture)``.

    Raises:
        ValueError: unknown model, a detection or segmentation checkpoint, a checkpoint of
            another architecture, or weights that fit no released DAT.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    names = model_names()
    if model_or_checkpoint in names:
        name, path = model_or_checkpoint, checkpoint
    elif os.path.isfile(model_or_checkpoint):
        if checkpoint is not None:
            raise ValueError(f'{model_or_checkpoint} is a file; name the model it belongs to instead '
                             f'(e.g. dat_tiny --checkpoint {checkpoint}), or drop --checkpoint')
        name, path = None, model_or_checkpoint
    else:
        raise ValueError(f'unknown model {model_or_checkpoint!r}: expected a registered model ({", ".join(names)}) '
                         'or a checkpoint file')
    if path is None:
        return timm.create_model(name, **model_kwargs).eval(), name
    try:
        return load_classifier(path, name, **model_kwargs)
    except TaskMismatchError as err:
        raise ValueError(f'{err}; deformvit export writes classification models only, so detection and '
                         'segmentation models are not exportable by this command') from err


def _input_size(model: nn.Module, size: Optional[Union[int, Sequence[int]]]) -> Tuple[int, int]:
    """``(H, W)`` to export at: ``size`` (an int or ``(H, W)``) or the model's input size."""
    backbone = _backbone(model)
    if size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or getattr(backbone, 'pretrained_cfg', None) or {}
        size = cfg.get('input_size', (3, 224, 224))[1:]
    size = (size,) if isinstance(size, int) else tuple(size)
    if len(size) not in (1, 2):
        raise ValueError(f'size must be H or (H, W), got {size}')
    height, width = size * (3 - len(size))
    minimum = backbone.min_input_size
    if height < minimum or width < minimum:
        raise ValueError(f'size {height}x{width} is smaller than the {minimum}x{minimum} minimum of this model '
                         f'(patch {backbone.patch_size} x {len(backbone.feature_info) - 1} downsamplings)')
    return height, width


def _images(model: nn.Module, batch: int, size: Tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Reproducible standard-normal images ``(batch, in_chans, H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, _backbone(model).in_chans, *size, generator=generator)


def _outputs(out) -> List[torch.Tensor]:
    """The output tensors of a model (a tensor, or the list of a ``features_only`` model)."""
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _output_names(model: nn.Module, program: torch.export.ExportedProgram) -> List[str]:
    """``logits`` (or ``features`` without a classifier), or ``features_i`` for ``features_only`` models."""
    count = len(program.graph_signature.user_outputs)
    if count == 1:
        return ['logits' if getattr(model, 'num_classes', 0) else 'features']
    return [f'features_{i}' for i in range(count)]


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Run attention through its explicit softmax path (the oracle of ``layers/attention.py``).

    The ONNX exporter of torch 2.14 fails to decompose DAT's window attention after
    ``F.scaled_dot_product_attention`` (it turns the reshape of the attention output into an
    invalid view); opsets before 23 have no attention operator, so the ONNX graph is the same
    MatMul / Softmax / MatMul either way.
    """
    fused = [m for m in model.modules() if getattr(m, 'fused_attn', False)]
    for module in fused:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in fused:
            module.fused_attn = True


# Reduce operators whose ``axes`` attribute became an input in opset 18 (ReduceSum's did in opset 13)
_REDUCE_AXES_TO_ATTRIBUTE = {
    'ReduceL1', 'ReduceL2', 'ReduceLogSum', 'ReduceLogSumExp', 'ReduceMax', 'ReduceMean', 'ReduceMin', 'ReduceProd',
    'ReduceSumSquare'}


def _to_opset_17(model):
    """Rewrite an opset-18 ONNX model, as torch.onnx writes it, for opset 17.

    Opset 18 moved the ``axes`` of most Reduce operators from an attribute to an input, gave Pad
    an optional ``axes`` input, Resize the ``antialias`` and ``keep_aspect_ratio_policy``
    attributes and Split ``num_outputs``. Nodes whose opset-17 form computes the same are
    rewritten (constant ``axes`` back to an attribute, default-valued new attributes dropped);
    anything else that changed between the two opsets raises ``ValueError``. (torch.onnx's own
    conversion fails on these graphs, onnx has no 18 -> 17 adapter for Pad, and it then keeps
    opset 18 with only a logged warning.)
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == 'Constant' and node.attribute and node.attribute[0].name == 'value':
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def refuse(node, why: str):
        raise ValueError(f'cannot write opset 17: {node.op_type} node {node.name!r} {why}; export with opset 18')

    def since(op_type: str, opset: int) -> Optional[int]:
        """The version of ``op_type``'s definition in force at ``opset`` (None: not defined yet)."""
        try:
            return onnx.defs.get_schema(op_type, opset).since_version
        except onnx.defs.SchemaError:
            return None

    for node in graph.node:
        if node.domain not in ('', 'ai.onnx') or since(node.op_type, 18) == since(node.op_type, 17):
            continue
        if since(node.op_type, 17) is None:
            refuse(node, 'does not exist in opset 17')
        attributes = {a.name: a for a in node.attribute}
        if node.op_type in _REDUCE_AXES_TO_ATTRIBUTE:
            axes = node.input[1] if len(node.input) > 1 and node.input[1] else None
            if axes is not None and axes not in constants:
                refuse(node, 'reduces over axes computed in the graph')
            noop = attributes.get('noop_with_empty_axes')
            if noop is not None:
                if helper.get_attribute_value(noop) and (axes is None or constants[axes].size == 0):
                    refuse(node, 'is a no-op on empty axes')
                node.attribute.remove(noop)
            del node.input[1:]
            if axes is not None and constants[axes].size:
                node.attribute.append(helper.make_attribute('axes', [int(a) for a in constants[axes]]))
        elif node.op_type == 'Pad':
            if len(node.input) > 3 and node.input[3]:
                refuse(node, 'pads only some axes')
        elif node.op_type == 'Resize':
            for name, default in (('antialias', 0), ('keep_aspect_ratio_policy', b'stretch')):
                if name in attributes:
                    if helper.get_attribute_value(attributes[name]) != default:
                        refuse(node, f'uses {name}')
                    node.attribute.remove(attributes[name])
        else:
            refuse(node, 'changed between opset 17 and 18')
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for opset in model.opset_import:
        if opset.domain in ('', 'ai.onnx'):
            opset.version = 17
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ValueError(f'cannot write opset 17: the rewritten graph is not valid ONNX ({err}); '
                         'export with opset 18') from err
    return model


def _dynamic_shapes(static: bool):
    return None if static else ({0: Dim('batch', min=1)},)


def capture(
        model: nn.Module,
        size: Optional[Union[int, Sequence[int]]] = None,
        batch: int = 1,
        static: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model``'s forward on ``(B, C, H, W)`` images.

    Height and width are fixed at ``size`` (see :func:`fixed_spatial_reason`); the batch axis
    is dynamic (traced at batch 2, since torch.export specialises sizes 0 and 1) unless
    ``static`` fixes it at ``batch``. The capture raises rather than specialise silently. It
    runs under ``torch.no_grad()``, as inference does.
    """
    size = _input_size(model, size)
    example = _images(model, batch if static else 2, size)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(static), strict=False)


def _check_shapes(batch: int, static: bool, size: Tuple[int, int], in_chans: int) -> List[Tuple[int, ...]]:
    batches = (batch,) if static else (batch, batch + 1)
    return [(b, in_chans, *size) for b in batches]


def _refuse_shapes(batch: int, static: bool, size: Tuple[int, int], in_chans: int, step: int) -> List[Tuple[int, ...]]:
    """Inputs the file must refuse: another height (and another batch when it is fixed)."""
    shapes = [(batch, in_chans, size[0] + step, size[1])]
    if static:
        shapes.append((batch + 1, in_chans, *size))
    return shapes


def _compare(model: nn.Module, run, shapes: Sequence[Tuple[int, ...]]) -> List[OutputCheck]:
    """Run the exported file (``run``) and ``model`` on the same random images of each shape."""
    checks = []
    for i, shape in enumerate(shapes):
        x = _images(model, shape[0], shape[2:], seed=i + 1)
        with torch.no_grad():
            expected = _outputs(model(x))
        got = run(x)
        if len(got) != len(expected):
            raise ValueError(f'the exported file gives {len(got)} outputs, the model {len(expected)}')
        diff = max((torch.as_tensor(g) - e).abs().max().item() for g, e in zip(got, expected))
        checks.append(OutputCheck(tuple(shape), diff))
    return checks


def _refuses(run, model: nn.Module, shape: Tuple[int, ...]) -> bool:
    """True when running the exported file on a ``shape`` input raises an error."""
    try:
        run(_images(model, shape[0], shape[2:]))
    except Exception:  # onnxruntime and the program's input guards raise their own error types
        return True
    return False


def _onnx_runner(path: str, threads: int = 0):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a refused input is expected
    options.intra_op_num_threads = threads
    # idle worker threads sleep instead of spinning, which would starve PyTorch running in between
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def _program_runner(path: str):
    module = torch.export.load(path).module()

    def run(x):
        with torch.no_grad():
            return _outputs(module(x))
    return run


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is not supported: ONNX export needs opset {MIN_OPSET} or newer '
                         f'(default {DEFAULT_OPSET})')


def _check_output_path(path: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')
    path = os.fspath(path)
    if not path.endswith(FORMATS[fmt]):
        raise ValueError(f'{fmt} files are written as {FORMATS[fmt]}; got {path}')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f'the output folder {folder} does not exist; create it first')
    return path


def _export(model, path, fmt, size, batch, static, check, tolerance, write, runner, opset=None) -> ExportReport:
    """Validate, ``write(tmp, size)`` beside ``path``, check ``tmp`` and rename it to ``path`` if it passes."""
    if batch < 1:
        raise ValueError(f'batch must be at least 1, got {batch}')
    path = _check_output_path(path, fmt)
    model.eval()
    size = _input_size(model, size)
    backbone = _backbone(model)
    report = ExportReport(path, fmt, (batch if static else None, backbone.in_chans, *size),
                          fixed_spatial_reason(model), opset=opset, tolerance=tolerance)

    def write_and_check(tmp: str) -> bool:
        start = time.perf_counter()
        write(tmp, size)
        report.seconds = time.perf_counter() - start
        if not check:
            return True
        run = runner(tmp)
        report.checks = _compare(model, run, _check_shapes(batch, static, size, backbone.in_chans))
        report.refused = [
            (shape, _refuses(run, model, shape))
            for shape in _refuse_shapes(batch, static, size, backbone.in_chans, backbone.patch_size)]
        return report.passed

    report.written = write_atomically(path, write_and_check)
    return report


def export_onnx(
        model: nn.Module,
        path: str,
        size: Optional[Union[int, Sequence[int]]] = None,
        batch: int = 1,
        opset: int = DEFAULT_OPSET,
        static: bool = False,
        check: bool = True,
        tolerance: float = TOLERANCE,
) -> ExportReport:
    """Write ``model`` as a self-contained ONNX file and check it with onnxruntime.

    The file is written under a temporary name beside ``path`` and renamed to ``path`` only
    when the check passes (or is skipped): a failed check or an error leaves no file.

    Args:
        model: a DAT or EAPT classifier (or its ``features_only`` wrapper); put in eval mode.
        path: output ``.onnx`` file; its folder must exist.
        size: input ``H`` or ``(H, W)``, fixed in the graph; default: the model's input size.
        batch: the first batch size checked (the second is ``batch + 1``), and the fixed
            batch with ``static``.
        opset: ONNX opset, at least :data:`MIN_OPSET`.
        static: fix the batch axis too.
        check: compare with PyTorch and check that inputs of another size (and another batch
            with ``static``) are refused.
        tolerance: the largest accepted absolute difference to PyTorch's outputs.

    Returns:
        :class:`ExportReport`; ``written`` is False when the check failed.
    """
    _check_opset(opset)

    def write(tmp: str, size: Tuple[int, int]) -> None:
        with _explicit_attention(model):
            program = capture(model, size, batch, static)
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=max(opset, EXPORTER_OPSET), dynamic_shapes=_dynamic_shapes(static),
            input_names=['images'], output_names=_output_names(model, program), verbose=False)
        import onnx
        proto = onnx_program.model_proto
        if opset < EXPORTER_OPSET:
            proto = _to_opset_17(proto)
        written = next(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))
        if written != opset:
            raise ValueError(f'torch.onnx wrote opset {written}, not the requested {opset}')
        onnx.save(proto, tmp)

    return _export(model, path, 'onnx', size, batch, static, check, tolerance, write, _onnx_runner, opset)


def export_program(
        model: nn.Module,
        path: str,
        size: Optional[Union[int, Sequence[int]]] = None,
        batch: int = 1,
        static: bool = False,
        check: bool = True,
        tolerance: float = TOLERANCE,
) -> ExportReport:
    """Write ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``, ``.pt2``) and check it.

    Arguments and the write-check-rename sequence as in :func:`export_onnx`. The program keeps
    the model's attention kernels (``F.scaled_dot_product_attention``); load it with
    ``torch.export.load(path).module()``.
    """
    def write(tmp: str, size: Tuple[int, int]) -> None:
        torch.export.save(capture(model, size, batch, static), tmp)

    return _export(model, path, 'exported-program', size, batch, static, check, tolerance, write, _program_runner)


def measure_latency(model: nn.Module, path: str, shape: Tuple[int, ...], runs: int = 10) -> dict:
    """Median seconds per forward pass of ``model`` (PyTorch, CPU) and of the exported file.

    onnxruntime (ONNX) or the loaded program (``.pt2``) runs with as many threads as PyTorch;
    each is warmed up once, then timed ``runs`` times, alternating.
    """
    if path.endswith('.onnx'):
        exported, label = _onnx_runner(path, torch.get_num_threads()), 'onnxruntime'
    else:
        exported, label = _program_runner(path), 'exported-program'
    x = _images(model, shape[0], shape[2:])
    times = {'pytorch': [], label: []}
    with torch.no_grad():
        model(x), exported(x)
        for _ in range(runs):
            for key, run in (('pytorch', model), (label, exported)):
                start = time.perf_counter()
                run(x)
                times[key].append(time.perf_counter() - start)
    return {key: sorted(values)[len(values) // 2] for key, values in times.items()}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"position_bias": "fixed"}}\', got {text!r}')
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', metavar='MODEL_OR_CHECKPOINT',
                        help='registered model (dat_tiny, eapt_small, ...) or a checkpoint file')
    parser.add_argument('--checkpoint', help='weights of the named model: an official DAT release file, a '
                                             '`deformvit convert` output or a classification training checkpoint')
    parser.add_argument('--format', choices=tuple(FORMATS), default='onnx',
                        help='onnx (default) or exported-program (torch.export.save, .pt2)')
    parser.add_argument('--output', help='output file (default: MODEL.onnx / MODEL.pt2 in the current folder)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset, at least {MIN_OPSET} (default {DEFAULT_OPSET})')
    parser.add_argument('--size', type=int, nargs='+', metavar=('H', 'W'),
                        help="input height [width], fixed in the graph (default: the model's input size)")
    parser.add_argument('--batch', type=int, default=1,
                        help='first batch size checked, and the fixed batch with --static (default 1)')
    parser.add_argument('--static', action='store_true', help='fix the batch axis too')
    parser.add_argument('--no-check', action='store_true', help='write the file without comparing it with PyTorch')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                        help=f'largest accepted max |diff| to PyTorch (default {TOLERANCE:.0e})')
    parser.add_argument('--model-args', type=_json_object, default={}, metavar='JSON',
                        help='timm.create_model arguments as JSON, e.g. \'{"position_bias": "fixed"}\'')
    parser.add_argument('--time', type=int, default=0, metavar='RUNS',
                        help='also time PyTorch and the exported file on one image (median of RUNS)')


def _describe(report: ExportReport, name: str) -> List[str]:
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


def main(args: argparse.Namespace) -> None:
    try:
        if args.format == 'onnx':
            _check_opset(args.opset)
        if args.output:
            _check_output_path(args.output, args.format)
        model, name = load_model(args.model, args.checkpoint, **args.model_args)
        output = args.output or name + FORMATS[args.format]
        options = dict(size=args.size, batch=args.batch, static=args.static, check=not args.no_check,
                       tolerance=args.tolerance)
        if args.format == 'onnx':
            report = export_onnx(model, output, opset=args.opset, **options)
        else:
            report = export_program(model, output, **options)
    except (ValueError, FileNotFoundError, UnsafeCheckpointError) as err:
        raise SystemExit(f'deformvit export: {err}') from err
    weights = args.checkpoint or (args.model if os.path.isfile(args.model) else 'random (no --checkpoint)')
    print(f'weights: {weights}')
    for line in _describe(report, name):
        print(line)
    if not report.written:
        raise SystemExit(f'deformvit export: the check failed ({"; ".join(report.failures)}); '
                         f'nothing was written to {output}')
    size_mb = os.path.getsize(output) / 2 ** 20
    print(f'wrote {output} ({size_mb:.1f} MB)' + ('' if report.checks else ' without checking it (--no-check)'))
    if args.time:
        shape = (1, *report.input_shape[1:])
        latency = measure_latency(model, output, shape, args.time)
        print(f'latency at {shape}, median of {args.time}: '
              + ', '.join(f'{key} {seconds * 1e3:.1f} ms' for key, seconds in latency.items()))
