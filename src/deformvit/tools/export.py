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
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from torch.export import Dim

from ..checkpoint import check_output_file, write_atomically
from ..errors import UsageError, optional
from ..layers import attention_switches
from ..models import PyramidBackbone
from .onnx_opset import to_opset_17

__all__ = [
    'DEFAULT_OPSET', 'FORMATS', 'MIN_OPSET', 'TOLERANCE', 'ExportReport', 'OutputCheck', 'capture', 'check_opset',
    'check_output_path', 'export_onnx', 'export_program', 'fixed_spatial_reason', 'measure_latency', 'model_names',
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
    'DATPlusPlus': 'DAT++ computes the neighborhood windows and their bias indices, the padding of maps smaller '
                   'than the window, and the reference and query grids of deformable attention from the input size',
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
    """The registered DAT, DAT++ and EAPT models."""
    return timm.list_models(module=['dat', 'datpp', 'eapt'])


def _backbone(model: nn.Module) -> nn.Module:
    """The DAT / EAPT inside ``model`` (a ``features_only`` wrapper holds it as ``model.model``)."""
    inner = getattr(model, 'model', model)
    if not isinstance(inner, PyramidBackbone) or type(inner).__name__ not in _FIXED_SPATIAL:
        raise ValueError(f'cannot export a {type(model).__name__}: expected a DAT, DAT++ or EAPT model '
                         f'({", ".join(model_names())})')
    return inner


def fixed_spatial_reason(model: nn.Module) -> str:
    """Why the exported graph of ``model`` has a fixed height and width (DAT or EAPT)."""
    return _FIXED_SPATIAL[type(_backbone(model)).__name__]


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
    ort = optional('onnxruntime', 'Checking the ONNX file')
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


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is not supported: ONNX export needs opset {MIN_OPSET} or newer '
                         f'(default {DEFAULT_OPSET})')


def check_output_path(path: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')
    return check_output_file(path, (FORMATS[fmt],), fmt)


def _export(model: nn.Module, path: str, fmt: str, write: Callable, runner: Callable,
            size: Optional[Union[int, Sequence[int]]] = None, batch: int = 1, static: bool = False, check: bool = True,
            tolerance: float = TOLERANCE, opset: Optional[int] = None) -> ExportReport:
    """Validate, ``write(tmp, size)`` beside ``path``, check ``tmp`` with ``runner`` and rename it to ``path`` if it
    passes; the other arguments are those of :func:`export_onnx`."""
    if batch < 1:
        raise ValueError(f'batch must be at least 1, got {batch}')
    path = check_output_path(path, fmt)
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
    check_opset(opset)
    # torch.onnx's exporter needs onnxscript and onnx, the check onnxruntime: all three are the export extra
    optional('onnxscript', 'ONNX export')
    onnx = optional('onnx', 'ONNX export')
    if check:
        optional('onnxruntime', 'Checking the ONNX file')

    def write(tmp: str, size: Tuple[int, int]) -> None:
        # the explicit softmax path: the ONNX exporter of torch 2.14 fails to decompose DAT's window
        # attention after F.scaled_dot_product_attention (it turns the reshape of the attention output
        # into an invalid view); opsets before 23 have no attention operator, so the ONNX graph is the
        # same MatMul / Softmax / MatMul either way
        with attention_switches(model, fused=False):
            program = capture(model, size, batch, static)
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=max(opset, EXPORTER_OPSET), dynamic_shapes=_dynamic_shapes(static),
            input_names=['images'], output_names=_output_names(model, program), verbose=False)
        proto = onnx_program.model_proto
        if opset < EXPORTER_OPSET:
            proto = to_opset_17(proto)
        written = next(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))
        if written != opset:
            raise ValueError(f'torch.onnx wrote opset {written}, not the requested {opset}')
        onnx.save(proto, tmp)

    return _export(model, path, 'onnx', write, _onnx_runner, size, batch, static, check, tolerance, opset)


def export_program(model: nn.Module, path: str, size: Optional[Union[int, Sequence[int]]] = None, batch: int = 1,
                   static: bool = False, **options) -> ExportReport:
    """Write ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``, ``.pt2``) and check it.

    Arguments (``check`` and ``tolerance`` among ``options``) and the write-check-rename sequence as in
    :func:`export_onnx`. The program keeps the model's attention kernels
    (``F.scaled_dot_product_attention``); load it with ``torch.export.load(path).module()``.
    """
    def write(tmp: str, size: Tuple[int, int]) -> None:
        torch.export.save(capture(model, size, batch, static), tmp)

    return _export(model, path, 'exported-program', write, _program_runner, size, batch, static, **options)


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
