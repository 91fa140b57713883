"""Peak memory of a forward pass or a training step, on any device.

On CUDA the caching allocator's peak (``torch.cuda.max_memory_allocated``); on CPU and meta a
tracker that adds the bytes of every tensor storage an operator creates and subtracts them when
the storage is freed (:class:`MemoryTracker`). Both include the model's parameters, buffers,
optimizer state and input. On the ``meta`` device the tracker runs without allocating anything,
so large batches fit a small machine (DAT Table 8's batch of 64, ``deformvit bench --table8``).
"""
import contextlib
import gc
import math
import weakref
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..runtime import autocast_context, autocast_dtype, resolve_device

__all__ = ['GIB', 'MIB', 'MemoryTracker', 'measure_peak_memory', 'peak_forward_memory']

MIB = 2 ** 20
GIB = 2 ** 30


def _on_device(model: nn.Module, device: torch.device) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device != device:
            raise ValueError(f'the model is on {tensor.device}, the input on {device}: move it first with '
                             f"model.to('{device}')" + (' (on meta the weights are dropped, shapes kept)'
                                                        if device.type == 'meta' else ''))


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
    autocast = autocast_context(device, autocast_dtype(precision, device))
    _on_device(model, device)
    x = torch.randn(tuple(input_shape), device=device)
    with torch.no_grad(), autocast():
        model(x[:1])

    def run() -> None:
        with torch.set_grad_enabled(grad), autocast():
            model(x)

    peak, _ = measure_peak_memory(run, [*model.parameters(), *model.buffers(), x], device, method)
    return peak
