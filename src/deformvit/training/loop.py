"""The training loop every task shares, on one device or many.

:func:`run` trains as a resolved config says (:mod:`deformvit.training.config`); its ``task``
field picks the :class:`~deformvit.tasks.Task` that supplies data, model, loss and evaluation.
Multi-GPU / multi-node: ``torchrun --nproc_per_node=N -m deformvit train ...`` (DDP, a
distributed sampler, reduced metrics, rank-0 logging and saving).
"""
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import timm
import torch
import torch.nn as nn
import yaml
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..checkpoint import check_output_folder, metadata_for
from ..data import DatasetError
from ..errors import UsageError, optional
from ..hub import names_official, official_weights
from ..runtime import DistributedContext, autocast_context, autocast_dtype, init_distributed, resolve_precision
from ..tasks import Task, get_task
from .config import check_config
from .reports import Logger, ProgressBar, write_reports
from .state import load_training_state, rng_state, save_training_state, seed_everything, set_rng_state

__all__ = ['TrainingDiverged', 'run', 'train_one_epoch']


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: evaluation shards without padding duplicates."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _run_folder(config: Dict, task: Task, resume: bool) -> str:
    """The run's folder, checked but not created: a run that fails before its first epoch leaves nothing."""
    data = 'digits' if config['data'] is None else os.path.basename(os.path.normpath(config['data']))
    name = f"{task.run_name(config)}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = config['output'] or os.path.join('runs', name)
    if not resume and os.path.exists(os.path.join(folder, 'last.safetensors')):
        raise FileExistsError(f'{folder} already holds a run; pass --resume to continue it or choose another --output')
    return check_output_folder(folder, 'run folder')


def _no_weight_decay(model: nn.Module) -> List[str]:
    """Qualified names of the parameters that every ``no_weight_decay()`` inside ``model`` lists."""
    names = []
    for prefix, module in model.named_modules():
        if hasattr(module, 'no_weight_decay'):
            names.extend(f'{prefix}.{n}' if prefix else n for n in module.no_weight_decay())
    return names


def _set_grad_checkpointing(model: nn.Module) -> None:
    modules = [m for m in model.modules() if hasattr(m, 'set_grad_checkpointing')]
    if not modules:
        raise UsageError('--grad-checkpointing: this model has no module that supports gradient checkpointing')
    modules[0].set_grad_checkpointing(True)


def _scheduler(optimizer, config: Dict, updates_per_epoch: int):
    """The learning-rate schedule, stepped once per optimizer update.

    ``cosine``: timm's cosine decay to ``min_lr``; ``multistep``: x ``decay_rate`` at each of
    ``decay_epochs``; ``poly``: ``(1 - t / T) ** poly_power`` decay to ``min_lr``. Warm-up is
    linear from ``warmup_lr`` over ``warmup_updates`` updates, or ``warmup_epochs`` epochs, cut to
    leave at least one update of decay when the run is shorter.
    """
    total = config['epochs'] * updates_per_epoch if config['iterations'] is None else config['iterations']
    warmup = config['warmup_updates'] if config['warmup_updates'] is not None else \
        round(config['warmup_epochs'] * updates_per_epoch)
    warmup = min(warmup, max(total - 1, 0))  # a budget shorter than the warm-up (a quick run) still decays
    if config['sched'] == 'cosine':
        if config['warmup_updates'] is None and config['iterations'] is None:
            scheduler, _ = create_scheduler_v2(
                optimizer, sched='cosine', num_epochs=config['epochs'], min_lr=config['min_lr'],
                warmup_lr=config['warmup_lr'], warmup_epochs=config['warmup_epochs'], step_on_epochs=False,
                updates_per_epoch=updates_per_epoch)
            return scheduler
        return CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=config['min_lr'], warmup_t=warmup,
                                 warmup_lr_init=config['warmup_lr'], warmup_prefix=True, t_in_epochs=False)
    if config['sched'] == 'multistep':
        return MultiStepLRScheduler(
            optimizer, decay_t=[round(e * updates_per_epoch) for e in config['decay_epochs']],
            decay_rate=config['decay_rate'], warmup_t=warmup, warmup_lr_init=config['warmup_lr'],
            warmup_prefix=False, t_in_epochs=False)
    if config['sched'] == 'poly':
        return PolyLRScheduler(optimizer, t_initial=total, power=config['poly_power'], lr_min=config['min_lr'],
                               warmup_t=warmup, warmup_lr_init=config['warmup_lr'], t_in_epochs=False)
    raise ValueError(f"sched must be one of cosine, multistep, poly; got {config['sched']!r}")


def _precision(precision: str, device: torch.device):
    """``(autocast context factory, gradient scaler or None, precision name)`` of a training run."""
    precision = resolve_precision(precision, device)
    if precision == 'fp16' and device.type != 'cuda':
        raise UsageError('fp16 mixed precision needs a CUDA device; use --precision bf16 or fp32 on CPU')
    dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return autocast_context(device, dtype), scaler, precision


def _fetch_official_weights_once(spec: Optional[str], name: str, ctx: DistributedContext) -> None:
    """With several processes, let one per machine download official weights (``--pretrained official``) while the
    others wait, rather than all of them downloading the same file at once."""
    if not ctx.distributed or not names_official(spec):
        return
    cfg = timm.models.get_pretrained_cfg(name)
    if ctx.local_rank == 0 and cfg is not None and cfg.url:
        official_weights(name)
    torch.distributed.barrier()


def run(config: Dict, resume: bool = False, ctx: Optional[DistributedContext] = None) -> Dict:
    """Train as ``config`` says (its ``task`` field picks the task); returns the final metrics.

    Every field is checked (:func:`~deformvit.training.config.check_config`) before any work; the run
    folder is created once the data and the model are ready.
    """
    task = get_task(config.get('task') or 'classify')
    check_config(config, task)
    # the run's logs and figures (the train extra): missing, they stop the run now rather than after training
    optional('torch.utils.tensorboard', 'Training (its TensorBoard logs)', package='tensorboard')
    optional('matplotlib.figure', 'Training (its figures)', package='matplotlib')
    ctx = ctx or init_distributed(config['device'])
    autocast, scaler, precision = _precision(config['precision'], ctx.device)
    metrics = task.metrics(config)
    folder = _run_folder(config, task, resume) if ctx.is_main else config['output']
    if ctx.distributed:
        folders = [folder]
        torch.distributed.broadcast_object_list(folders, src=0)
        folder = folders[0]
    start_epoch, best_score, state = 0, -math.inf, None
    if resume:
        weights, metadata, state = load_training_state(folder)
        config = dict(state['config'], **{k: config[k] for k in ('epochs', 'device', 'workers')})
        start_epoch, best_score = state['epoch'] + 1, state.get('best_score', state.get('best_top1', -math.inf))
        if start_epoch >= config['epochs'] and config['iterations'] is None:
            raise UsageError(f"the run in {folder} has trained {start_epoch} of {config['epochs']} epochs; pass a "
                             f'larger --epochs to train it further')
    config['output'] = folder

    train_set, val_set = task.datasets(config)
    classes = list(train_set.classes)
    if resume and json.loads(metadata['classes']) != classes:
        recorded = json.loads(metadata['classes'])
        raise DatasetError(f'the checkpoint in {folder} was trained on {len(recorded)} classes, '
                           f'the data has {len(classes)}: {classes[:10]}')

    seed_everything(config['seed'])
    if not resume:
        _fetch_official_weights_once(config['pretrained'], config[task.model_field], ctx)
    # a resumed run takes its weights from the checkpoint, not from the initial --pretrained file
    model, architecture, model_kwargs = task.build_model(dict(config, pretrained=None) if resume else config, classes)
    if resume:
        model.load_state_dict(weights)
    if config['grad_checkpointing']:
        _set_grad_checkpointing(model)
    model.to(ctx.device)
    if config['channels_last']:
        model.to(memory_format=torch.channels_last)
    unwrapped = model

    global_batch = config['batch_size'] * ctx.world_size * config['accum_steps']
    lr = config['lr'] if config['lr'] is not None else config['lr_base'] * global_batch / config['lr_base_size']
    optimizer = create_optimizer_v2(_param_groups(model, config['weight_decay']), opt=config['opt'], lr=lr,
                                    weight_decay=config['weight_decay'])
    generator = torch.Generator()
    train_sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                       seed=config['seed'])
    loader_args = dict(num_workers=config['workers'], collate_fn=task.collate, pin_memory=ctx.device.type == 'cuda')
    train_loader = DataLoader(train_set, batch_size=config['batch_size'], sampler=train_sampler, drop_last=True,
                              generator=generator, **loader_args)
    val_loader = DataLoader(val_set, batch_size=task.eval_batch_size(config),
                            sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size), **loader_args)
    if len(train_loader) == 0:
        raise DatasetError(f'{len(train_set)} training images are fewer than one batch of {config["batch_size"]} '
                           f'per process; lower --batch-size')
    updates_per_epoch = math.ceil(len(train_loader) / config['accum_steps'])
    if config['iterations'] is not None:  # an iteration budget (segmentation schedules) sets the epochs
        config['epochs'] = math.ceil(config['iterations'] / updates_per_epoch)
    scheduler = _scheduler(optimizer, config, updates_per_epoch)
    model_ema = ModelEmaV3(model, decay=config['ema_decay']) if config['model_ema'] else None
    if resume:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if model_ema is not None and state.get('model_ema'):
            model_ema.load_state_dict(state['model_ema'])
        set_rng_state(state['rng'])
    if config['compile']:
        model = torch.compile(model)
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda' else None,
            find_unused_parameters=task.find_unused_parameters)

    if ctx.is_main:
        os.makedirs(folder, exist_ok=True)
    logger = Logger(folder, start_epoch, metrics) if ctx.is_main else None
    if ctx.is_main:
        with open(os.path.join(folder, 'config.yaml'), 'w') as f:
            yaml.safe_dump(dict(config, lr=lr, global_batch=global_batch, precision=precision,
                                world_size=ctx.world_size, classes=classes), f, sort_keys=False)
        print(f"training {architecture} ({sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M params) on "
              f"{len(train_set)} images / {len(classes)} classes, held out {len(val_set)}; {ctx.world_size} "
              f"process(es) on {ctx.device}, global batch {global_batch}, lr {lr:.3g}, {precision}; output {folder}",
              flush=True)

    evaluation = None
    eval_model = model_ema.module if model_ema is not None else unwrapped
    step = task.training_step(config, classes)
    for epoch in range(start_epoch, config['epochs']):
        # every epoch's randomness is a function of (seed, epoch, rank): a resumed run replays it exactly
        seed_everything(config['seed'] * 100_003 + epoch * 7_919 + ctx.rank)
        generator.manual_seed(config['seed'] * 100_003 + epoch)
        train_sampler.set_epoch(epoch)
        bar = ProgressBar(len(train_loader), epoch, config['epochs']) if ctx.is_main else None
        progress = bar.report if bar is not None else None
        try:
            stats = train_one_epoch(model, train_loader, optimizer, step, ctx, epoch, scheduler, autocast, scaler,
                                    config['accum_steps'], config['clip_grad'], model_ema, progress,
                                    max_updates=config['iterations'])
        finally:
            if bar is not None:
                bar.close()
        if stats.images == 0:
            raise DatasetError(f'epoch {epoch + 1} trained on no image: all {stats.skipped} image(s) of its batches '
                               'were unreadable or skipped; check the training data')
        last_epoch = epoch == config['epochs'] - 1
        evaluated = last_epoch or (epoch + 1) % max(1, config['eval_every']) == 0
        evaluation = task.evaluate(eval_model, val_loader, ctx, autocast, config) if evaluated else None
        if not ctx.is_main:
            continue
        row = dict(epoch=epoch, train_loss=round(stats.loss, 5), lr=stats.lr,
                   images_per_s=round(stats.images / stats.seconds, 1),
                   skipped=stats.skipped + (evaluation.skipped if evaluation else 0), seconds=round(stats.seconds, 1))
        if evaluation is not None:
            row.update({k: round(evaluation.metrics[k], 5) for k in metrics})
        logger.log(row)
        score = evaluation.metrics[metrics[0]] if evaluation is not None else -math.inf
        best = score > best_score
        best_score = max(best_score, score)
        print(f"epoch {epoch + 1}/{config['epochs']}: train loss {stats.loss:.4f}"
              + (f', {task.describe(evaluation)}' if evaluation is not None else '')
              + f", {row['images_per_s']} img/s"
              + (f", {row['skipped']} unreadable images skipped" if row['skipped'] else '') + (' (best)' if best else ''),
              flush=True)
        metadata = metadata_for(architecture, model_kwargs, classes, epoch, task=task.name,
                                **({metrics[0]: f'{score:.3f}'} if evaluation is not None else {}))
        state = dict(epoch=epoch, best_score=best_score, config=config, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                     model_ema=model_ema.state_dict() if model_ema else None, rng=rng_state())
        save_training_state(folder, 'last', unwrapped, metadata, state)  # the EMA, if any, is in the state
        if best:
            save_training_state(folder, 'best', eval_model, metadata)
    if ctx.is_main and evaluation is not None:
        write_reports(folder, task, metrics, logger.rows(config['epochs']), evaluation, classes)
    if ctx.distributed:  # every rank leaves together; a rank exiting with a live process group aborts
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return dict(folder=folder, **(evaluation.metrics if evaluation is not None else {}))


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on weights of rank 2 and more, except the position tables the backbone lists."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_no_weight_decay(model))
