"""Throughput, latency and peak memory of deformvit models next to timm references, in one run.

    deformvit bench                                     # dat_tiny, eapt_small + 4 timm references
    deformvit bench --models dat_tiny --references convnext_tiny --mode both --batch 32
    deformvit bench --device cuda --precision fp32 bf16 --compile --csv bench.csv
    deformvit bench --device meta --batch 64 --mode train   # peak memory only, nothing allocated
    deformvit bench --table8                            # DAT Table 8 memory column, batch 64

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
docs/benchmarks.md describes the method and gives measured tables.
"""
import argparse
import contextlib
import csv
import difflib
import gc
import inspect
import math
import statistics
import time
import weakref
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.amp.autocast_mode import is_autocast_available
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import models as _registered  # noqa: F401  (registers the models with timm)
from .complexity import count_macs, count_parameters
from .paper import MEMORY, rows as paper_rows

__all__ = [
    'CSV_COLUMNS', 'DAT_TABLE8_ROWS', 'DEFAULT_MODELS', 'DEFAULT_REFERENCES', 'MODES', 'PRECISIONS', 'MemoryTracker',
    'add_arguments', 'benchmark', 'check_precision', 'create_model', 'device_name', 'format_markdown',
    'format_table8_markdown', 'main', 'measure_peak_memory', 'peak_forward_memory', 'resolve_device',
    'TABLE8_BATCH', 'table8_memory', 'write_csv',
]

PRECISIONS: Dict[str, Optional[torch.dtype]] = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
MODES = ('infer', 'train')
DEFAULT_MODELS = ('dat_tiny', 'eapt_small')
SWIN_T = 'swin_tiny_patch4_window7_224'
DEFAULT_REFERENCES = (SWIN_T, 'deit_small_patch16_224', 'convnext_tiny', 'pvt_v2_b2')
MIB = 2 ** 20
TABLE8_BATCH = 64  # DAT Table 8: "a forward pass with a batch size of 64"
GIB = 2 ** 30

# DAT Table 8 (Appendix A): (label, model, create_model kwargs, paper's GPU memory in GB) at batch 64,
# from the rows of deformvit.paper.
DAT_TABLE8_ROWS: Tuple[Tuple[str, str, Dict, Optional[float]], ...] = tuple(
    (row.label, row.model, dict(row.kwargs), row.reported.get(MEMORY)) for row in paper_rows('DAT', 'Table 8'))

CSV_COLUMNS = (
    'model', 'mode', 'precision', 'params_m', 'gmacs', 'images_per_s', 'latency_ms', 'latency_p90_ms',
    'speed_vs_ref', 'peak_memory_mib', 'memory_vs_ref', 'compile_s', 'reference', 'device', 'device_name',
    'threads', 'batch', 'size', 'warmup', 'repeats', 'compile', 'memory_method', 'torch', 'timm',
)


# ---------------------------------------------------------------------------------------------
# Devices, precisions, models

def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA when available, else CPU), checked to exist.

    ``cpu`` and ``cuda[:N]`` run the models; ``meta`` only tracks memory (no data, no timing).
    """
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f'unknown device {device!r}: expected cpu, cuda, cuda:N or meta') from err
    if device.type not in ('cpu', 'cuda', 'meta'):
        raise ValueError(f'device {device.type!r} is not supported: expected cpu, cuda, cuda:N or meta')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError('device cuda was asked for but no GPU is visible (torch.cuda.is_available() is False); '
                             'use --device cpu, or --device meta to measure memory without a GPU')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f'device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible')
    return device


def check_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None for fp32), after checking ``device`` supports it.

    bf16 and fp16 run under ``torch.autocast``: they need autocast on the device type
    (``is_autocast_available``; not on ``meta``) and, on CUDA, bfloat16 needs a GPU that computes in it
    (compute capability 8.0 or newer).
    """
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: expected one of {", ".join(PRECISIONS)}')
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if not is_autocast_available(device.type):
        raise ValueError(f'{precision} runs under torch.autocast, which is not available on device {device.type}; '
                         'use fp32' + (' (meta tracks fp32 memory only)' if device.type == 'meta' else ''))
    if (device.type == 'cuda' and dtype is torch.bfloat16
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise ValueError(f'bf16 is not supported by {torch.cuda.get_device_name(device)} '
                         '(bfloat16 needs compute capability 8.0 or newer); use fp16 or fp32')
    return dtype


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's vector instruction set and whether it computes bf16/fp16 natively."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'meta':
        return 'meta (no data)'
    native = [name for name, probe in (('bf16', '_is_avx512_bf16_supported'), ('fp16', '_is_amx_fp16_supported'))
              if getattr(torch.cpu, probe, lambda: False)()]
    return f'CPU {torch.backends.cpu.get_cpu_capability()}, native ' + ('/'.join(native) or 'fp32 only')


def create_model(name: str, size: Optional[int] = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with a clear error for unknown names.

    When ``size`` differs from the model's default input size and the model takes an ``img_size``
    argument (ViTs, Swin, DAT, EAPT), it is built for ``size``.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else '; see timm.list_models()'
        raise ValueError(f'unknown model {name!r}: not a registered timm or deformvit model{hint}')
    model = timm.create_model(name, **kwargs)
    default_size = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, size, size))[-1]
    if size is not None and size != default_size and 'img_size' in inspect.signature(type(model)).parameters:
        model = timm.create_model(name, img_size=size, **kwargs)
    return model


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
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


def _on_device(model: nn.Module, device: torch.device) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device != device:
            raise ValueError(f'the model is on {tensor.device}, the input on {device}: move it first with '
                             f"model.to('{device}')" + (' (on meta the weights are dropped, shapes kept)'
                                                        if device.type == 'meta' else ''))


# ---------------------------------------------------------------------------------------------
# Peak memory

def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    sizes = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            sizes[storage._cdata] = storage.nbytes()
    return sum(sizes.values())


def _cpu_standin(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A CPU tensor with ``tensor``'s shape, dtype, last stride and ``requires_grad`` whose other
    strides are 0, so that it holds one row of data."""
    if tensor is None:
        return None
    data = torch.empty(max(tensor.shape[-1], 1) * max(tensor.stride(-1), 1), dtype=tensor.dtype)
    strides = [0] * (tensor.dim() - 1) + [tensor.stride(-1)]
    return data.as_strided(tensor.shape, strides).requires_grad_(tensor.requires_grad)


def _sdpa_as_on_cpu(tracker: 'MemoryTracker', query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` on meta tensors with the kernel CPU tensors would get.

    On meta, PyTorch always takes the math path, which materialises the attention matrix (and,
    with autograd, keeps it); on CPU the same call usually runs the fused flash kernel, which keeps
    the output and the log-sum-exp only. The choice is asked of the CPU selector on stand-ins of the
    same shapes, out of ``tracker``'s sight.
    """
    with tracker.paused():
        standins = [_cpu_standin(t) for t in (query, key, value, attn_mask)]
        backend = torch._fused_sdp_choice(*standins, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        del standins
    if backend == int(SDPBackend.FLASH_ATTENTION):
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # as the CPU path converts it
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(~attn_mask, -math.inf)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _cpu_convolution_layout(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A meta convolution output laid out as the CPU kernels lay it out: channels-last when the input
    or the weight is, where the meta kernel returns a contiguous tensor. The layout decides whether
    later reshapes copy, so it changes the live bytes."""
    channels_last = any(suggest_memory_format(t) == torch.channels_last for t in (input, weight))
    if out.dim() == 4 and channels_last and not out.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(out, memory_format=torch.channels_last)
    return out


class _CpuAttentionKernelsOnMeta(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` on meta tensors to the kernel CPU would use."""

    def __init__(self, tracker: 'MemoryTracker'):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == 'meta':
            return _sdpa_as_on_cpu(self.tracker, *args, **kwargs)
        return func(*args, **kwargs)


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages, counted operator by operator.

    Every operator output whose schema says it is newly allocated (not a view, not written in
    place) adds its storage's bytes once; a weak-reference finaliser on the storage subtracts
    them when the storage is freed. Views, in-place and ``out=`` results add nothing (a storage
    that an ``out=`` operator resizes is updated). Storages alive before tracking starts are
    counted only when listed in ``baseline`` (parameters, buffers, inputs, optimizer state).

    This is the CPU and meta counterpart of CUDA's ``max_memory_allocated``. It sees what
    operators return, not the scratch space kernels allocate and free inside themselves (e.g.
    convolution column buffers), nor allocator rounding. Because it needs no data it also runs
    on the ``meta`` device, which lets large batches be measured on a small machine. There, two
    kernels are made to behave as on CPU, so that meta and CPU count the same bytes:
    ``F.scaled_dot_product_attention`` takes the kernel CPU tensors of the same shapes would get
    (meta alone always takes the math path, which materialises the attention matrix), and
    convolutions return CPU's channels-last layout for channels-last inputs (which decides
    whether later reshapes copy).

    Args:
        baseline: tensors alive before tracking whose storages count from the start.
        emulate_cpu: on meta, choose attention kernels and convolution layouts as CPU does.

    Attributes:
        baseline_bytes, current_bytes, peak_bytes: bytes at entry, now and at the peak.
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = (), emulate_cpu: bool = True):
        super().__init__()
        self._baseline = list(baseline)
        self._emulate_cpu = emulate_cpu
        self._attention_mode = _CpuAttentionKernelsOnMeta(self) if emulate_cpu else None
        self._paused = False
        self._bytes: Dict[int, int] = {}
        self._finalizers: Dict[int, weakref.finalize] = {}
        self.baseline_bytes = self.current_bytes = self.peak_bytes = 0

    def __enter__(self):
        for tensor in self._baseline:
            self._add(tensor)
        self._baseline = []
        self.baseline_bytes = self.current_bytes
        if self._attention_mode is not None:
            self._attention_mode.__enter__()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            if self._attention_mode is not None:
                self._attention_mode.__exit__(exc_type, exc_value, traceback)
            for finalizer in self._finalizers.values():
                finalizer.detach()
            self._finalizers.clear()

    @contextlib.contextmanager
    def paused(self):
        """Operators run inside this context are not counted."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def _release(self, key: int) -> None:
        self.current_bytes -= self._bytes.pop(key)
        self._finalizers.pop(key, None)

    def _add(self, tensor: torch.Tensor, fresh: bool = True) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        known = self._bytes.get(key)
        if known is None:
            if not fresh:  # a view of, or a write into, a storage that is not tracked
                return
            self._bytes[key] = nbytes
            self._finalizers[key] = weakref.finalize(storage, self._release, key)
            self.current_bytes += nbytes
        elif known != nbytes:  # resized in place
            self._bytes[key] = nbytes
            self.current_bytes += nbytes - known
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        if self._emulate_cpu and func is torch.ops.aten.convolution.default and out.device.type == 'meta':
            out = _cpu_convolution_layout(out, args[0], args[1])
        returns = func._schema.returns
        outputs = out if len(returns) > 1 else (out,)
        for spec, value in zip(returns, outputs):
            fresh = spec.alias_info is None
            for tensor in pytree.tree_leaves(value):
                self._add(tensor, fresh)
        return out


def measure_peak_memory(
        run: Callable[[], object],
        baseline: Iterable[torch.Tensor],
        device: torch.device,
        method: str = 'auto',
) -> Tuple[int, int]:
    """Peak bytes while ``run()`` executes, and the bytes of ``baseline`` it starts from.

    Args:
        run: the pass to measure (one forward or training step).
        baseline: tensors the pass starts from (parameters, buffers, optimizer state, inputs);
            they count in the peak.
        device: where ``run`` computes.
        method: ``'allocator'`` (CUDA's ``max_memory_allocated``), ``'tracker'``
            (:class:`MemoryTracker`; any device) or ``'auto'`` (allocator on CUDA, else tracker).

    Returns:
        ``(peak, baseline)`` in bytes. On CUDA the peak is ``max_memory_allocated`` minus what
        was allocated before the pass plus the baseline's own bytes, so other models held by the
        process do not count.
    """
    if method == 'auto':
        method = 'allocator' if device.type == 'cuda' else 'tracker'
    if method not in ('allocator', 'tracker'):
        raise ValueError(f"memory method must be 'auto', 'allocator' or 'tracker', got {method!r}")
    baseline = list(baseline)
    gc.collect()
    if method == 'tracker':
        with MemoryTracker(baseline) as tracker:
            run()
        return tracker.peak_bytes, tracker.baseline_bytes
    if device.type != 'cuda':
        raise ValueError(f'the allocator method reads CUDA memory statistics; device {device} needs the tracker')
    baseline_bytes = _storage_bytes(baseline)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + baseline_bytes, baseline_bytes


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def peak_forward_memory(
        model: nn.Module,
        input_shape: Sequence[int],
        device: Optional[Union[str, torch.device]] = None,
        grad: bool = True,
        precision: str = 'fp32',
        method: str = 'auto',
) -> int:
    """Peak bytes of one forward pass of ``model`` on a random ``input_shape`` input.

    Parameters, buffers and the input count. With ``grad`` the pass records autograd, so the
    peak holds the activations a training step keeps for its backward pass (DAT Table 8 measures
    "a forward pass"); without, it is an inference pass. The model's train/eval mode is used as
    set. One untracked batch-1 pass first fills per-size caches (shift-window masks).

    Args:
        model: the network, already on ``device`` (``model.to('meta')`` keeps shapes only).
        input_shape: ``(B, C, H, W)``.
        device: ``cpu``, ``cuda`` or ``meta`` (default: CUDA when available).
        grad: record autograd (True) or run under ``torch.no_grad``.
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (autocast).
        method: see :func:`measure_peak_memory`.
    """
    device = resolve_device(device)
    dtype = check_precision(precision, device)
    _on_device(model, device)
    x = torch.randn(tuple(input_shape), device=device)
    with torch.no_grad(), _autocast(device, dtype):
        model(x[:1])

    def run() -> None:
        with torch.set_grad_enabled(grad), _autocast(device, dtype):
            model(x)

    peak, _ = measure_peak_memory(run, [*model.parameters(), *model.buffers(), x], device, method)
    return peak


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
            with torch.inference_mode(), _autocast(self.device, self.dtype):
                model(self.x)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.dtype):
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
    dtypes = {precision: check_precision(precision, device) for precision in precisions}
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
    with _torch_threads(threads):
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


def _round_robin(steps: Mapping[str, _Step], device: torch.device, warmup: int, repeats: int
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
    row's, next to the same ratio of the paper's figures.

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
    check_precision(precision, device)
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
    """Write rows (of :func:`benchmark` or :func:`table8_memory`) to a CSV file with a header row."""
    columns = list(CSV_COLUMNS) if rows and 'mode' in rows[0] else list(rows[0]) if rows else []
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ('' if v is None else v) for k, v in row.items()})


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME',
                        help=f'models to measure, any timm name (default: {" ".join(DEFAULT_MODELS)})')
    parser.add_argument('--references', nargs='+', default=list(DEFAULT_REFERENCES), metavar='NAME',
                        help='timm reference models measured in the same run, or "none" '
                             f'(default: {" ".join(DEFAULT_REFERENCES)})')
    parser.add_argument('--ratio-to', metavar='NAME',
                        help=f'model the ratio columns divide by (default: {SWIN_T} when measured)')
    parser.add_argument('--device', help='cpu, cuda[:N] or meta (memory only); default: cuda if available, '
                                         'else cpu (--table8: else meta)')
    parser.add_argument('--precision', nargs='+', default=['fp32'], choices=list(PRECISIONS),
                        help='fp32, and/or bf16 / fp16 under autocast (default: fp32)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the models (compile time reported apart)')
    parser.add_argument('--mode', choices=('infer', 'train', 'both'), default='infer',
                        help='infer: forward pass; train: forward, backward and AdamW step (default: infer)')
    parser.add_argument('--batch', type=int, help='images per batch (default: 16; --table8: 64)')
    parser.add_argument('--size', type=int, default=224, help='input side (default: 224)')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed rounds (default: 3)')
    parser.add_argument('--repeats', type=int, default=10, help='timed rounds; medians over them (default: 10)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory pass')
    parser.add_argument('--table8', action='store_true',
                        help='measure the memory column of DAT Table 8 (D-DETR vs DAT attention) instead')
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
        write_csv(rows, args.csv)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(markdown)


def main(args: argparse.Namespace, extra_models: Optional[Mapping[str, nn.Module]] = None) -> List[Dict]:
    """Run ``deformvit bench``; ``extra_models`` (label -> module) are measured before the named ones."""
    try:
        if args.table8:
            if len(args.precision) > 1 or args.compile:
                raise ValueError('--table8 measures memory, at one --precision, without --compile')
            device = args.device or ('cuda' if torch.cuda.is_available() else 'meta')
            with _torch_threads(args.threads):
                results = table8_memory(DAT_TABLE8_ROWS, batch=args.batch or TABLE8_BATCH, size=args.size,
                                        device=device, precision=args.precision[0])
            rows = [dict(r, kwargs=repr(r['kwargs'])) for r in results]
            _write(args, rows, format_table8_markdown(results))
            return rows
        models = dict(extra_models or {})
        models.update((name, name) for name in _model_list(args))
        reference = args.ratio_to or (SWIN_T if SWIN_T in models else None)
        modes = MODES if args.mode == 'both' else (args.mode,)
        rows = benchmark(
            models, batch=args.batch or 16, size=args.size, device=args.device, precisions=args.precision,
            modes=modes, compile_models=args.compile, warmup=args.warmup, repeats=args.repeats,
            threads=args.threads, reference=reference, memory=not args.no_memory)
        _write(args, rows, format_markdown(rows))
        return rows
    except ValueError as err:
        raise SystemExit(f'deformvit bench: {err}') from err
