"""Where and how computation runs: devices, precisions and processes.

The one device resolver, precision table and distributed context of deformvit. Training,
evaluation and the tools take ``--device`` and ``--precision`` through these functions, so
every command accepts the same values and reports the same errors. Everything is
device-agnostic: the same code runs on CPU, on one GPU, or in many processes under
``torchrun`` (DDP over NCCL on CUDA, gloo on CPU).
"""
import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional, Union

import torch
import torch.distributed as dist
from torch.amp.autocast_mode import is_autocast_available

from .errors import UsageError

__all__ = [
    'PRECISIONS', 'DistributedContext', 'autocast_context', 'autocast_dtype', 'init_distributed', 'resolve_device',
    'resolve_precision',
]

# precision name -> autocast dtype (None: plain fp32)
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a ``torch.device``, checked to exist.

    ``None`` and ``'auto'`` pick CUDA when a GPU is visible, else the CPU. ``cpu`` and
    ``cuda[:N]`` compute; ``meta`` holds shapes only (the memory tracker of the tools uses it).

    Raises:
        UsageError: (a ``ValueError``) an unknown device, CUDA without a visible GPU, or a GPU index that
            does not exist.
    """
    if device is None or device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f'unknown device {device!r}: expected cpu, cuda, cuda:N or meta') from err
    if device.type not in ('cpu', 'cuda', 'meta'):
        raise UsageError(f'device {device.type!r} is not supported: expected cpu, cuda, cuda:N or meta')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('device cuda was asked for but no GPU is visible (torch.cuda.is_available() is False); '
                             'use --device cpu, or --device meta to measure memory without a GPU')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f'device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible')
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``'auto'`` resolved: bf16 on CUDA devices that compute in it, else fp32."""
    if precision == 'auto':
        return 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'fp32'
    return precision


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None for fp32), after checking ``device`` supports it.

    bf16 and fp16 run under ``torch.autocast``: they need autocast on the device type
    (``is_autocast_available``; not on ``meta``) and, on CUDA, bfloat16 needs a GPU that computes in it
    (compute capability 8.0 or newer).

    Raises:
        UsageError: (a ``ValueError``) an unknown precision, or one the device cannot run.
    """
    if precision not in PRECISIONS:
        raise UsageError(f'unknown precision {precision!r}: expected one of {", ".join(PRECISIONS)}')
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if not is_autocast_available(device.type):
        raise UsageError(f'{precision} runs under torch.autocast, which is not available on device {device.type}; '
                         'use fp32' + (' (meta tracks fp32 memory only)' if device.type == 'meta' else ''))
    if (device.type == 'cuda' and dtype is torch.bfloat16
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise UsageError(f'bf16 is not supported by {torch.cuda.get_device_name(device)} '
                         '(bfloat16 needs compute capability 8.0 or newer); use fp16 or fp32')
    return dtype


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], ContextManager]:
    """A factory of ``torch.autocast`` contexts in ``dtype`` on ``device`` (no-op contexts for None)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DistributedContext:
    """Where this process stands in a (possibly single-process) run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        """Sum ``values`` over all processes (a no-op for one process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device: Optional[str] = 'auto') -> DistributedContext:
    """Set up torch.distributed from the ``torchrun`` environment, if present.

    Args:
        device: ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``
            (see :func:`resolve_device`); a bare ``'cuda'`` becomes the process's local GPU.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device)
    if dev.type == 'meta':
        raise UsageError('device meta holds no data; training and evaluation need cpu or cuda')
    if dev.type == 'cuda':
        if dev.index is None:
            dev = torch.device('cuda', local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return DistributedContext(rank, world_size, local_rank, dev)
