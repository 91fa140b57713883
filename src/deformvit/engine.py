"""Training and evaluation loops, distributed helpers and resumable checkpoints.

Everything here is device-agnostic: the same code runs on CPU, one GPU or many processes
under ``torchrun`` (DDP over NCCL on CUDA, gloo on CPU).
"""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import accuracy, dispatch_clip_grad

from .checkpoint import load_state_dict_file, read_safetensors_metadata, save_safetensors, save_torch

__all__ = [
    'DistributedContext',
    'EvalResult',
    'TrainingDiverged',
    'evaluate',
    'init_distributed',
    'load_training_state',
    'save_training_state',
    'train_one_epoch',
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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


def init_distributed(device: str = 'auto') -> DistributedContext:
    """Set up torch.distributed from the ``torchrun`` environment, if present.

    Args:
        device: ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        if dev.index is None:
            dev = torch.device('cuda', local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return DistributedContext(rank, world_size, local_rank, dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    skipped: int
    lr: float


def train_one_epoch(
        model: nn.Module,
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        step: Callable,
        ctx: DistributedContext,
        epoch: int,
        scheduler=None,
        autocast: Callable = contextlib.nullcontext,
        scaler: Optional[torch.amp.GradScaler] = None,
        accum_steps: int = 1,
        clip_grad: Optional[float] = None,
        model_ema=None,
        progress: Optional[Callable] = None,
        max_updates: Optional[int] = None,
) -> EpochStats:
    """One pass over ``loader``; returns the mean loss over processed images.

    Args:
        loader: yields ``(inputs, targets, skipped)``; ``inputs`` is None when every sample of
            the batch was unreadable.
        step: ``step(model, inputs, targets, device) -> (loss, images)``, run under ``autocast``;
            a None loss skips the batch.
        max_updates: stop once the run has made this many optimizer updates (an iteration
            budget that ends inside an epoch).

    Gradients are accumulated over ``accum_steps`` batches (without DDP synchronisation in
    between). A non-finite loss raises :class:`TrainingDiverged` before any update uses it.
    """
    model.train()
    updates_per_epoch = math.ceil(len(loader) / accum_steps)
    num_updates = epoch * updates_per_epoch
    loss_sum, images, skipped = 0.0, 0, 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    last_index = len(loader) - 1
    for index, (inputs, targets, n_skipped) in enumerate(loader):
        skipped += n_skipped
        if inputs is None:
            continue
        update = (index + 1) % accum_steps == 0 or index == last_index
        sync = contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast():
                loss, n = step(model, inputs, targets, ctx.device)
            if loss is None:
                continue
            loss_value = loss.item()  # the step's one host synchronisation
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f'loss became {loss_value} at epoch {epoch}, batch {index} '
                    f'(lr {optimizer.param_groups[0]["lr"]:.3g}); stopping. The last saved checkpoint is '
                    'left as it was: lower the learning rate, enable gradient clipping or use fp32/bf16.')
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            if clip_grad:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
        loss_sum += loss_value * n
        images += n
        if progress is not None:
            progress(loss=loss_value, lr=optimizer.param_groups[0]['lr'],
                     images_per_s=images * ctx.world_size / (time.perf_counter() - start))
        if max_updates is not None and num_updates >= max_updates:
            break
    loss_sum, images, skipped = ctx.all_reduce_sum([loss_sum, images, skipped])
    return EpochStats(loss_sum / max(images, 1), int(images), time.perf_counter() - start, int(skipped),
                      optimizer.param_groups[0]['lr'])


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    images: int
    skipped: int
    per_class: List[float]
    confusion: np.ndarray  # (true, predicted) counts


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        num_classes: int,
        ctx: DistributedContext,
        autocast: Callable = contextlib.nullcontext,
        channels_last: bool = False,
) -> EvalResult:
    """Top-1/top-5 accuracy (in %), loss, per-class accuracy and the confusion matrix."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=ctx.device)
    loss_sum, top1_sum, top5_sum, images, skipped = 0.0, 0.0, 0.0, 0, 0
    for x, y, n_skipped in loader:
        skipped += n_skipped
        if x is None:
            continue
        x, y = x.to(ctx.device), y.to(ctx.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction='sum').item()
        top1, top5 = accuracy(logits, y, topk=(1, min(5, num_classes)))
        top1_sum += top1.item() * x.shape[0] / 100
        top5_sum += top5.item() * x.shape[0] / 100
        images += x.shape[0]
        confusion.index_put_((y, logits.argmax(-1)), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    loss_sum, top1_sum, top5_sum, images, skipped = ctx.all_reduce_sum([loss_sum, top1_sum, top5_sum, images, skipped])
    if ctx.distributed:
        dist.all_reduce(confusion)
    confusion = confusion.cpu().numpy()
    totals = confusion.sum(1)
    per_class = [float(confusion[i, i] / totals[i] * 100) if totals[i] else float('nan') for i in range(num_classes)]
    n = max(images, 1)
    return EvalResult(loss_sum / n, top1_sum / n * 100, top5_sum / n * 100, int(images), int(skipped),
                      per_class, confusion)


def save_training_state(
        folder: str,
        name: str,
        model: nn.Module,
        metadata: Dict[str, str],
        state: Optional[Dict] = None,
) -> str:
    """Write ``name.safetensors`` (weights) and, given ``state``, ``name.state.pt`` (optimizer,
    scheduler, scaler, epoch, RNG states...), each atomically. Returns the weights path.

    The weights file is written last, so a ``.state.pt`` never describes weights that are not
    on disk yet; :func:`load_training_state` checks that both belong to the same epoch.
    """
    weights = os.path.join(folder, f'{name}.safetensors')
    if state is not None:
        save_torch(state, os.path.join(folder, f'{name}.state.pt'))
    save_safetensors(model.state_dict(), weights, metadata=metadata)
    return weights


def rng_state() -> Dict:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def load_training_state(folder: str, name: str = 'last') -> tuple:
    """``(weights state dict, metadata, training state)`` of a run folder's ``name`` checkpoint.

    Raises:
        FileNotFoundError: the folder holds no such checkpoint.
        ValueError: weights and training state disagree (an interrupted write of an old version).
    """
    weights = os.path.join(folder, f'{name}.safetensors')
    state_path = os.path.join(folder, f'{name}.state.pt')
    if not (os.path.isfile(weights) and os.path.isfile(state_path)):
        raise FileNotFoundError(f'no resumable checkpoint in {folder}: expected {name}.safetensors and '
                                f'{name}.state.pt (written at the end of every epoch)')
    metadata = read_safetensors_metadata(weights)
    state = torch.load(state_path, map_location='cpu', weights_only=True)
    if str(state.get('epoch')) != metadata.get('epoch'):
        raise ValueError(f'{weights} (epoch {metadata.get("epoch")}) and {state_path} (epoch {state.get("epoch")}) '
                         'do not belong together')
    return load_state_dict_file(weights), metadata, state


def metadata_for(model_name: str, model_kwargs: Dict, classes: List[str], epoch: int, task: str = 'classify',
                 **extra) -> Dict[str, str]:
    """safetensors metadata from which a model is rebuilt (:func:`deformvit.tasks.load_checkpoint`)."""
    return {'task': task, 'architecture': model_name, 'model_kwargs': json.dumps(model_kwargs),
            'classes': json.dumps(classes), 'epoch': str(epoch), **{k: str(v) for k, v in extra.items()}}
