"""Throughput, latency and peak memory of deformvit models next to timm references, in one run.

    deformvit bench                                     # dat_tiny, datpp_tiny, eapt_small + 4 timm references
    deformvit bench --models dat_tiny --references convnext_tiny --mode both --batch 32
    deformvit bench --device cuda --precision fp32 bf16 --compile --csv bench.csv
    deformvit bench --device meta --batch 64 --mode train   # peak memory only, nothing allocated
    deformvit bench --table8                            # DAT Table 8 memory column, batch 64
    deformvit bench --detectors atss sparse_rcnn        # EAPT Table IV's FPS: R-50, Swin-T, EAPT-S

Every model (any timm name; deformvit's are registered) and every reference is timed in
interleaved rounds, so that machine noise hits all alike: --warmup untimed rounds, then
--repeats rounds in which each model runs once. Latency is the median (and p90) milliseconds per
batch, throughput the batch size over the median latency, and the ratio column divides each
throughput by the --ratio-to model's (Swin-T by default). "infer" is a forward pass under
torch.inference_mode in eval mode; "train" is a training step in train mode: forward,
cross-entropy on random labels, backward and an AdamW step. bf16/fp16 run under torch.autocast
(fp16 training with a GradScaler); --compile wraps the models in torch.compile and reports the
first call, which compiles, separately from the timing.

Peak memory is measured afterwards, in a separate pass of one batch: on CUDA the caching
allocator's peak (torch.cuda.max_memory_allocated); on CPU and meta a tracker that adds the
bytes of every tensor storage an operator creates and subtracts them when the storage is freed.
Both include the model's parameters, buffers, optimizer state and input. --device meta runs the
tracker without allocating anything (no timing), so large batches fit a small machine.
--table8 gives DAT's Table 8 memory column (D-DETR attention against DAT's at batch 64);
--detectors times whole detectors (:func:`detection_benchmark`), EAPT Table IV's FPS column;
docs/benchmarks.md describes the method and gives measured tables.
"""
import contextlib
import csv
import gc
import math
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import fast_paths
from ..runtime import autocast_context, autocast_dtype, resolve_device
from ..tasks import DETECTORS, build_detector, create_model
from .complexity import count_macs, count_parameters
from .memory import GIB, MIB, measure_peak_memory, peak_forward_memory
from .paper import EAPT_TABLE_IV, MEMORY, TABLE8_BATCH, rows as paper_rows

__all__ = [
    'CSV_COLUMNS', 'DAT_TABLE8_ROWS', 'DEFAULT_MODELS', 'DEFAULT_REFERENCES', 'DETECTION_BACKBONES', 'DETECTION_SIZE',
    'MODES', 'SWIN_T', 'TABLE8_BATCH', 'benchmark', 'detection_benchmark', 'device_name', 'format_detection_markdown',
    'format_markdown', 'format_table8_markdown', 'table8_memory', 'torch_threads', 'write_csv',
]

MODES = ('infer', 'train')
DEFAULT_MODELS = ('dat_tiny', 'datpp_tiny', 'eapt_small')
SWIN_T = 'swin_tiny_patch4_window7_224'
DEFAULT_REFERENCES = (SWIN_T, 'deit_small_patch16_224', 'convnext_tiny', 'pvt_v2_b2')
DETECTION_BACKBONES = ('resnet50', SWIN_T, 'eapt_small')  # EAPT Table IV's R-50, Swin-T and EAPT-S
DETECTION_SIZE = (800, 1280)  # (height, width): the image EAPT Table IV and DAT Tables 3-4 count at

# DAT Table 8 (Appendix A): (label, model, create_model kwargs, paper's GPU memory in GB) at batch 64,
# from the rows of deformvit.tools.paper.
DAT_TABLE8_ROWS: Tuple[Tuple[str, str, Dict, Optional[float]], ...] = tuple(
    (row.label, row.model, dict(row.kwargs), row.reported.get(MEMORY)) for row in paper_rows('DAT', 'Table 8'))

CSV_COLUMNS = (
    'model', 'mode', 'precision', 'params_m', 'gmacs', 'images_per_s', 'latency_ms', 'latency_p90_ms',
    'speed_vs_ref', 'peak_memory_mib', 'memory_vs_ref', 'compile_s', 'reference', 'device', 'device_name',
    'threads', 'batch', 'size', 'warmup', 'repeats', 'compile', 'memory_method', 'torch', 'timm',
)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's vector instruction set and whether it computes bf16/fp16 natively."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'meta':
        return 'meta (no data)'
    native = [name for name, probe in (('bf16', '_is_avx512_bf16_supported'), ('fp16', '_is_amx_fp16_supported'))
              if getattr(torch.cpu, probe, lambda: False)()]
    return f'CPU {torch.backends.cpu.get_cpu_capability()}, native ' + ('/'.join(native) or 'fp32 only')


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged), then restore the count."""
    if threads is not None and threads < 1:
        raise ValueError(f'threads must be >= 1, got {threads}')
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Timing

class _Step:
    """One measured unit of a model: an inference batch or a training step."""

    def __init__(self, model: nn.Module, compiled: nn.Module, mode: str, x: torch.Tensor,
                 dtype: Optional[torch.dtype]):
        self.model, self.compiled, self.mode, self.x, self.dtype = model, compiled, mode, x, dtype
        self.device = x.device
        self.optimizer = self.scaler = self.labels = None
        if mode == 'train':
            num_classes = getattr(model, 'num_classes', None)
            if num_classes is None:
                with torch.no_grad():
                    num_classes = model(x[:1]).shape[-1]
            if not num_classes:
                raise ValueError('train mode needs a classifier (num_classes > 0) for its cross-entropy loss')
            self.labels = torch.randint(0, num_classes, (x.shape[0],), device=x.device)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            if dtype is torch.float16:
                self.scaler = torch.amp.GradScaler(x.device.type)

    def __call__(self, eager: bool = False) -> None:
        model = self.model if eager else self.compiled
        if self.mode == 'infer':
            with torch.inference_mode(), autocast_context(self.device, self.dtype)():
                model(self.x)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.dtype)():
            loss = F.cross_entropy(model(self.x), self.labels)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def state(self) -> List[torch.Tensor]:
        """Tensors the step starts from: parameters, buffers, optimizer state, input, labels."""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.x]
        if self.optimizer is not None:
            tensors += [self.labels] + [t for s in self.optimizer.state.values() for t in s.values()
                                        if isinstance(t, torch.Tensor)]
        return tensors


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (0..1) of ``values``."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def benchmark(
        models: Union[Sequence[str], Mapping[str, Union[str, nn.Module]]],
        batch: int = 16,
        size: int = 224,
        device: Optional[Union[str, torch.device]] = None,
        precisions: Sequence[str] = ('fp32',),
        modes: Sequence[str] = ('infer',),
        compile_models: bool = False,
        warmup: int = 3,
        repeats: int = 10,
        threads: Optional[int] = None,
        reference: Optional[str] = None,
        memory: bool = True,
) -> List[Dict]:
    """Time and measure models side by side; one row per model x mode x precision.

    For each mode and precision, every model runs ``warmup`` untimed rounds and ``repeats`` timed
    rounds, one batch per model per round, with the starting model rotating from round to round;
    then peak memory is measured for each model in a separate pass (:func:`measure_peak_memory`).

    Args:
        models: timm names, or ``{label: timm name or module}`` (modules are moved to ``device``).
        batch: images per batch.
        size: input side (models taking ``img_size`` are built for it).
        device: ``cpu``, ``cuda`` or ``meta`` (memory only, nothing timed); default CUDA if available.
        precisions: any of ``'fp32'``, ``'bf16'``, ``'fp16'`` (autocast).
        modes: ``'infer'`` and/or ``'train'``.
        compile_models: wrap models in ``torch.compile``; the first call's time is ``compile_s``.
        warmup: untimed rounds (at least 1 with ``compile_models``: it compiles).
        repeats: timed rounds.
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
        reference: label of the model the ratio columns divide by (None: no ratios).
        memory: measure peak memory.

    Returns:
        Rows as dicts with the keys of :data:`CSV_COLUMNS`: throughput in images/s, latencies in
        ms, memory in MiB (None where not measured), parameters in millions and forward GMACs per
        image (fvcore convention, :func:`deformvit.count_macs`).
    """
    device = resolve_device(device)
    dtypes = {precision: autocast_dtype(precision, device) for precision in precisions}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f'unknown mode {mode!r}: expected infer or train')
    if batch < 1 or size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f'batch, size and repeats must be >= 1 and warmup >= 0; got batch={batch}, size={size}, '
                         f'repeats={repeats}, warmup={warmup}')
    if compile_models and device.type == 'meta':
        raise ValueError('--compile needs real tensors; the meta device measures memory only (no timing)')
    if compile_models and warmup < 1:
        raise ValueError('--compile needs at least one warm-up round, in which the models are compiled')
    if not isinstance(models, Mapping):
        models = {name: name for name in models}
    if not models:
        raise ValueError('no models to benchmark')
    if reference is not None and reference not in models:
        raise ValueError(f'ratio reference {reference!r} is not among the benchmarked models {list(models)}')
    with torch_threads(threads):
        modules = {label: (create_model(m, size) if isinstance(m, str) else m).to(device)
                   for label, m in models.items()}
        compiled = {label: torch.compile(m) if compile_models else m for label, m in modules.items()}
        common = dict(
            device=str(device), device_name=device_name(device), threads=torch.get_num_threads(), batch=batch,
            size=size, warmup=warmup, repeats=repeats, compile=compile_models, torch=torch.__version__,
            timm=timm.__version__, reference=reference)
        costs = {label: (count_parameters(m) / 1e6, count_macs(m, (3, size, size)) / 1e9)
                 for label, m in modules.items()}
        rows = []
        for mode in modes:
            for precision, dtype in dtypes.items():
                for m in modules.values():
                    m.train(mode == 'train')
                x = torch.randn(batch, 3, size, size, device=device)
                steps = {label: _Step(modules[label], compiled[label], mode, x, dtype) for label in modules}
                timings = _round_robin(steps, device, warmup, repeats) if device.type != 'meta' else {}
                block = []
                for label, step in steps.items():
                    params_m, gmacs = costs[label]
                    row = dict(common, model=label, mode=mode, precision=precision, params_m=params_m, gmacs=gmacs,
                               images_per_s=None, latency_ms=None, latency_p90_ms=None, compile_s=None,
                               peak_memory_mib=None, memory_method=None, speed_vs_ref=None, memory_vs_ref=None)
                    if label in timings:
                        first, times = timings[label]
                        median = statistics.median(times)
                        row.update(latency_ms=1e3 * median, latency_p90_ms=1e3 * _percentile(times, 0.9),
                                   images_per_s=batch / median, compile_s=first if compile_models else None)
                    if memory:
                        row.update(_step_memory(step, device, compile_models))
                    block.append(row)
                del steps
                _add_ratios(block, reference)
                rows += block
    return rows


def _round_robin(steps: Mapping[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
                 ) -> Dict[str, Tuple[float, List[float]]]:
    """``{label: (first call seconds, [seconds per timed round])}``."""
    labels = list(steps)
    first: Dict[str, float] = {}
    times: Dict[str, List[float]] = {label: [] for label in labels}
    for round_index in range(warmup + repeats):
        start = round_index % len(labels)
        for label in labels[start:] + labels[:start]:
            seconds = _timed(steps[label], device)
            first.setdefault(label, seconds)
            if round_index >= warmup:
                times[label].append(seconds)
    return {label: (first[label], times[label]) for label in labels}


def _step_memory(step: _Step, device: torch.device, compiled: bool) -> Dict:
    """Peak memory of one step, in a pass of its own, with how it was measured."""
    eager = compiled and device.type != 'cuda'  # the tracker cannot see inside compiled kernels
    if device.type == 'meta':
        step(eager=True)  # fills caches and creates the optimizer state, as the timing rounds do elsewhere
    if step.optimizer is not None:
        step.optimizer.zero_grad(set_to_none=True)
    peak, _ = measure_peak_memory(lambda: step(eager=eager), step.state(), device)
    method = 'cuda max_memory_allocated' if device.type == 'cuda' else 'dispatch tracker'
    return dict(peak_memory_mib=peak / MIB, memory_method=method + (' (eager model)' if eager else ''))


def _add_ratios(rows: List[Dict], reference: Optional[str]) -> None:
    ref = next((row for row in rows if row['model'] == reference), None)
    if ref is None:
        return
    for row in rows:
        if row['images_per_s'] is not None and ref['images_per_s']:
            row['speed_vs_ref'] = row['images_per_s'] / ref['images_per_s']
        if row['peak_memory_mib'] is not None and ref['peak_memory_mib']:
            row['memory_vs_ref'] = row['peak_memory_mib'] / ref['peak_memory_mib']


# ---------------------------------------------------------------------------------------------
# Detectors (EAPT Table IV's FPS)

def detection_benchmark(
        detectors: Sequence[str],
        backbones: Sequence[str] = DETECTION_BACKBONES,
        image_size: Tuple[int, int] = DETECTION_SIZE,
        batch: int = 1,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = 'fp32',
        warmup: int = 1,
        repeats: int = 5,
        threads: Optional[int] = None,
        num_classes: int = 80,
        **build_kwargs,
) -> List[Dict]:
    """Images per second of whole detectors, each framework on each backbone, as EAPT Table IV's FPS.

    A step is the detector's inference on ``batch`` random images of ``image_size``: torchvision's
    resize and normalisation (a 1280x800 image stays 1280x800 at the default 800 / 1333 sizes), the
    backbone, pyramid and heads, box decoding and NMS, and the boxes scaled back, as a detector's FPS
    counts them. The backbones of one framework are timed in interleaved rounds (``warmup`` untimed,
    then ``repeats`` timed, the starting model rotating), so that machine noise hits them alike, and
    each is given as a ratio to the first backbone, with the paper's ratio beside it.

    Args:
        detectors: names of :data:`~deformvit.tasks.DETECTORS`.
        backbones: backbone names; the ratios divide by the first.
        image_size: ``(height, width)`` of the images.
        batch: images per step.
        device: ``cpu`` or ``cuda``; default CUDA if available.
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (autocast).
        warmup, repeats: untimed and timed rounds.
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
        num_classes: object classes of the detectors (COCO's 80).
        build_kwargs: further arguments of :func:`~deformvit.tasks.build_detector` (``min_size``...).

    Returns:
        One row per detector and backbone: ``detector``, ``backbone``, ``params_m``, ``images_per_s``,
        ``latency_ms`` (median per step), ``speed_vs_first``, the paper's ``paper_fps`` and
        ``paper_vs_first`` (None where EAPT Table IV has no such row), and the run's settings.
    """
    device = resolve_device(device)
    if device.type == 'meta':
        raise ValueError('the meta device measures memory only; detector throughput needs cpu or cuda')
    dtype = autocast_dtype(precision, device)
    unknown = [name for name in detectors if name not in DETECTORS]
    if unknown or not detectors:
        raise ValueError(f'unknown detectors {unknown}; expected one or more of {", ".join(DETECTORS)}')
    if not backbones:
        raise ValueError('no backbones to benchmark; expected one or more model names')
    if batch < 1 or repeats < 1 or warmup < 0 or min(image_size) < 1:
        raise ValueError(f'batch, repeats and the image sides must be >= 1 and warmup >= 0; got batch={batch}, '
                         f'image_size={tuple(image_size)}, repeats={repeats}, warmup={warmup}')
    rows = []
    with torch_threads(threads):
        common = dict(device=str(device), device_name=device_name(device), threads=torch.get_num_threads(),
                      batch=batch, height=image_size[0], width=image_size[1], precision=precision, warmup=warmup,
                      repeats=repeats, torch=torch.__version__)
        images = [torch.rand(3, *image_size, device=device) for _ in range(batch)]
        for detector in detectors:
            models = {backbone: build_detector(detector, backbone, num_classes, **build_kwargs).eval().to(device)
                      for backbone in backbones}

            def step(model: nn.Module) -> Callable[[], None]:
                def run() -> None:
                    with torch.inference_mode(), autocast_context(device, dtype)():
                        model(images)
                return run
            timings = _round_robin({backbone: step(model) for backbone, model in models.items()}, device, warmup,
                                   repeats)
            block = []
            for backbone, model in models.items():
                median = statistics.median(timings[backbone][1])
                paper = EAPT_TABLE_IV.get((detector, backbone), {})
                block.append(dict(common, detector=detector, backbone=backbone,
                                  params_m=count_parameters(model) / 1e6, images_per_s=batch / median,
                                  latency_ms=1e3 * median, paper_fps=paper.get('fps')))
            first, first_paper = block[0]['images_per_s'], block[0]['paper_fps']
            for row in block:
                row['speed_vs_first'] = row['images_per_s'] / first
                row['paper_vs_first'] = (row['paper_fps'] / first_paper
                                         if row['paper_fps'] is not None and first_paper else None)
            rows += block
            del models
    return rows


# ---------------------------------------------------------------------------------------------
# DAT Table 8

def table8_memory(
        rows: Sequence[Tuple[str, str, Mapping, Optional[float]]] = DAT_TABLE8_ROWS,
        batch: int = TABLE8_BATCH,
        size: int = 224,
        device: Optional[Union[str, torch.device]] = 'meta',
        reference: Optional[str] = None,
        precision: str = 'fp32',
) -> List[Dict]:
    """The memory column of DAT Table 8 (Appendix A): peak memory of a forward pass at ``batch``.

    Each row is built with ``create_model(model, size, **kwargs)``. Its peak is measured with
    autograd recording in train mode (what the paper's "forward pass" of a training step keeps) and
    without gradients in eval mode (:func:`peak_forward_memory`), and divided by the reference
    row's, next to the same ratio of the paper's figures. The fast paths are off
    (:func:`deformvit.layers.fast_paths`): they lighten DAT's attention and not D-DETR's sampling,
    and the table compares the two mechanisms under one implementation, as the paper's did.

    Args:
        rows: ``(label, model name, create_model kwargs, paper GB or None)``; default
            :data:`DAT_TABLE8_ROWS`.
        batch: images per forward pass (the paper: 64).
        size: input side (the paper: 224).
        device: ``'meta'`` (tracked, nothing allocated; default), ``'cpu'`` or ``'cuda'``.
        reference: label of the row ratios divide by (default: the last row, DAT-T).
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (not on meta).

    Returns:
        One dict per row: ``label``, ``model``, ``kwargs``, ``params_m``, ``gmacs`` (per image),
        ``peak_gib`` (with autograd), ``peak_no_grad_gib``, ``paper_gb``, ``ratio`` and
        ``paper_ratio`` (to the ``reference`` row; None without paper figures), ``device``, ``batch``,
        ``size``, ``precision``.
    """
    device = resolve_device(device)
    autocast_dtype(precision, device)
    if not rows:
        raise ValueError('no rows to measure')
    labels = [row[0] for row in rows]
    reference = labels[-1] if reference is None else reference
    if reference not in labels:
        raise ValueError(f'reference row {reference!r} is not among {labels}')
    results = []
    for label, name, kwargs, paper_gb in rows:
        model = create_model(name, size, **kwargs)
        params_m = count_parameters(model) / 1e6
        model = model.to(device)
        gmacs = count_macs(model, (3, size, size)) / 1e9
        shape = (batch, 3, size, size)
        with fast_paths(False):  # both attention mechanisms under one implementation
            peak = peak_forward_memory(model.train(), shape, device, grad=True, precision=precision)
            peak_no_grad = peak_forward_memory(model.eval(), shape, device, grad=False, precision=precision)
        results.append(dict(
            label=label, model=name, kwargs=dict(kwargs), params_m=params_m, gmacs=gmacs, peak_gib=peak / GIB,
            peak_no_grad_gib=peak_no_grad / GIB, paper_gb=paper_gb, device=str(device), batch=batch, size=size,
            precision=precision))
        del model
        gc.collect()
    ref = results[labels.index(reference)]
    for result in results:
        result['reference'] = reference
        result['ratio'] = result['peak_gib'] / ref['peak_gib']
        result['paper_ratio'] = (result['paper_gb'] / ref['paper_gb']
                                 if result['paper_gb'] is not None and ref['paper_gb'] else None)
    return results


# ---------------------------------------------------------------------------------------------
# Output

def _fmt(value, digits: int = 2, suffix: str = '') -> str:
    return '-' if value is None else f'{value:.{digits}f}{suffix}'


def _header(row: Dict) -> str:
    compiled = 'torch.compile' if row['compile'] else 'eager'
    timing = ('memory only (meta)' if row['device'] == 'meta'
              else f'{row["warmup"]} warm-up + {row["repeats"]} timed rounds, round-robin, {compiled}')
    ratios = f', ratios to {row["reference"]}' if row['reference'] else ''
    return (f'device {row["device"]} ({row["device_name"]}), torch {row["torch"]}, timm {row["timm"]}, '
            f'threads {row["threads"]}, batch {row["batch"]}, {row["size"]}x{row["size"]}, {timing}{ratios}')


def format_markdown(rows: Sequence[Dict]) -> str:
    """A header line and a markdown table of :func:`benchmark` rows."""
    if not rows:
        return ''
    lines = [_header(rows[0]), '',
             '| model | mode | precision | params (M) | GMACs | images/s | ms/batch median | ms/batch p90 | '
             'speed vs ref | peak memory (MiB) | memory vs ref |',
             '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for row in rows:
        lines.append(
            f'| {row["model"]} | {row["mode"]} | {row["precision"]} | {row["params_m"]:.2f} | {row["gmacs"]:.2f} | '
            f'{_fmt(row["images_per_s"])} | {_fmt(row["latency_ms"], 1)} | {_fmt(row["latency_p90_ms"], 1)} | '
            f'{_fmt(row["speed_vs_ref"], 2, "x")} | {_fmt(row["peak_memory_mib"], 0)} | '
            f'{_fmt(row["memory_vs_ref"], 2, "x")} |')
    if any(row['compile_s'] is not None for row in rows):
        lines += ['', 'first call (compilation): ' + ', '.join(
            f'{row["model"]} {row["mode"]} {row["precision"]} {row["compile_s"]:.1f} s'
            for row in rows if row['compile_s'] is not None)]
    methods = sorted({row['memory_method'] for row in rows if row['memory_method']})
    if methods:
        lines += ['', f'peak memory: {"; ".join(methods)}; includes parameters, buffers, optimizer state and input']
    return '\n'.join(lines) + '\n'


def format_detection_markdown(rows: Sequence[Dict]) -> str:
    """A header line and a markdown table of :func:`detection_benchmark` rows, the paper's FPS beside them."""
    if not rows:
        return ''
    first = rows[0]
    lines = [f'detectors: device {first["device"]} ({first["device_name"]}), torch {first["torch"]}, threads '
             f'{first["threads"]}, {first["precision"]}, batch {first["batch"]} of {first["width"]}x{first["height"]}, '
             f'{first["warmup"]} warm-up + {first["repeats"]} timed rounds, round-robin per detector; ratios to '
             f'the first backbone of each detector; paper: EAPT Table IV (one GPU)', '',
             '| detector | backbone | params (M) | images/s | ms/step median | vs first | paper FPS '
             '| paper vs first |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        lines.append(f'| {r["detector"]} | {r["backbone"]} | {r["params_m"]:.2f} | {r["images_per_s"]:.3f} | '
                     f'{r["latency_ms"]:.0f} | {r["speed_vs_first"]:.2f}x | {_fmt(r["paper_fps"], 1)} | '
                     f'{_fmt(r["paper_vs_first"], 2, "x")} |')
    return '\n'.join(lines) + '\n'


def format_table8_markdown(results: Sequence[Dict]) -> str:
    """A markdown table of :func:`table8_memory` results next to the paper's column."""
    if not results:
        return ''
    first = results[0]
    lines = [f'DAT Table 8 memory: forward pass at batch {first["batch"]}, {first["size"]}x{first["size"]}, '
             f'{first["precision"]}, device {first["device"]}; ratios to {first["reference"]}', '',
             '| row | params (M) | GMACs | peak, autograd (GiB) | peak, no grad (GiB) | paper (GB) | ratio '
             '| paper ratio |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in results:
        lines.append(f'| {r["label"]} | {r["params_m"]:.2f} | {r["gmacs"]:.2f} | {r["peak_gib"]:.2f} | '
                     f'{r["peak_no_grad_gib"]:.2f} | {_fmt(r["paper_gb"], 1)} | {r["ratio"]:.2f}x | '
                     f'{_fmt(r["paper_ratio"], 2, "x")} |')
    return '\n'.join(lines) + '\n'


def write_csv(rows: Sequence[Dict], path: str) -> None:
    """Write rows (of :func:`benchmark`, :func:`detection_benchmark` or :func:`table8_memory`) to a CSV file with
    a header row."""
    columns = list(CSV_COLUMNS) if rows and 'mode' in rows[0] else list(rows[0]) if rows else []
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ('' if v is None else v) for k, v in row.items()})
