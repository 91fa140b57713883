"""Image classification: ImageNet-style folders or the embedded digits, timm's augmentation,
top-1 / top-5, per-class accuracy and the confusion matrix."""
import contextlib
import csv
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy
from torch.utils.data import DataLoader

from ..data import DatasetError, DigitsDataset, ImageFolderDataset, collate_skipping_corrupt, validation_folder
from ..errors import optional, unknown_model_argument
from ..hub import OFFICIAL, resolve_weights_spec
from ..runtime import DistributedContext
from .base import POSITIVE_INT, PROBABILITY, Evaluation, Limit, Task

__all__ = ['ClassificationTask', 'EvalResult', 'evaluate_classifier', 'evaluate_folder', 'plot_confusion_matrix']


class ClassificationTask(Task):
    """``deformvit train``: timm's transforms, Mixup/CutMix, label smoothing; top-1/top-5."""
    name = 'classify'
    command = 'deformvit train'
    defaults = dict(
        model='dat_tiny', img_size=224, label_smoothing=0.1, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0,
        hflip=0.5, scale=[0.08, 1.0], augment=True, model_kwargs={})
    recipes = ('digits', 'dat-in1k')
    metric_names = ('top1', 'top5', 'val_loss')
    collate = staticmethod(collate_skipping_corrupt)
    flags = ('model', 'img_size')
    limits = dict(img_size=POSITIVE_INT, label_smoothing=Limit(0, 1, open_high=True), mixup=Limit(0), cutmix=Limit(0),
                  reprob=PROBABILITY, hflip=PROBABILITY, scale=Limit(0, 1, open_low=True, count=2))

    def add_arguments(self, parser) -> None:
        parser.add_argument('--model', help='any registered model name (dat_nano, dat_tiny, ... or a timm model)')
        parser.add_argument('--data', help='folder with train/<class>/* and val/<class>/*; default: embedded digits')
        parser.add_argument('--img-size', type=int, help='training and evaluation resolution')

    def datasets(self, config: Dict):
        pretrained_cfg = timm.models.get_pretrained_cfg(config['model'])
        data_cfg = resolve_data_config({'input_size': (3, config['img_size'], config['img_size'])},
                                       pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
        eval_tf = create_transform(**data_cfg, is_training=False)
        train_tf = create_transform(
            data_cfg['input_size'], is_training=True, scale=tuple(config['scale']), hflip=config['hflip'],
            auto_augment=config['auto_augment'], re_prob=config['reprob'], interpolation=data_cfg['interpolation'],
            mean=data_cfg['mean'], std=data_cfg['std']) if config['augment'] else eval_tf
        if config['data'] is None:
            return DigitsDataset('train', train_tf), DigitsDataset('val', eval_tf)
        root = config['data']
        train = ImageFolderDataset(os.path.join(root, 'train'), train_tf)
        val = ImageFolderDataset(validation_folder(root) or os.path.join(root, 'val'), eval_tf, classes=train.classes)
        return train, val

    def build_model(self, config: Dict, classes: List[str]):
        kwargs = dict(config['model_kwargs'], num_classes=len(classes), drop_path_rate=config['drop_path'],
                      img_size=config['img_size'])
        weights = resolve_weights_spec(config['pretrained'], config['model'])
        if weights == OFFICIAL:  # downloaded once into the cache (deformvit.hub)
            kwargs.update(pretrained=True)
        elif weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=weights))
        try:
            try:
                model = timm.create_model(config['model'], **kwargs)
            except TypeError as error:
                if "'img_size'" not in str(error):
                    raise
                kwargs.pop('img_size')  # a timm model without img_size
                model = timm.create_model(config['model'], **kwargs)
        except TypeError as error:
            usage = unknown_model_argument(config['model'], error, config['model_kwargs'], 'model_kwargs')
            if usage is None:
                raise
            raise usage from error
        file_kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay',
                                                                    'drop_path_rate')}
        return model, config['model'], file_kwargs

    def training_step(self, config: Dict, classes: List[str]):
        return _ClassificationStep(config, len(classes))

    def evaluate(self, model, loader, ctx, autocast, config) -> Evaluation:
        result = evaluate_classifier(model, loader, len(loader.dataset.classes), ctx, autocast,
                                     config.get('channels_last', False))
        return Evaluation(dict(top1=result.top1, top5=result.top5, val_loss=result.loss), result.images,
                          result.skipped, result)

    def describe(self, evaluation: Evaluation) -> str:
        m = evaluation.metrics
        return f"val loss {m['val_loss']:.4f}, top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%"

    def reports(self, folder, rows, evaluation, classes):
        result = evaluation.detail
        plot_confusion_matrix(result.confusion, classes, os.path.join(folder, 'confusion_matrix.png'))
        with open(os.path.join(folder, 'confusion_matrix.csv'), 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['true\\predicted'] + classes)
            for name, counts in zip(classes, result.confusion.astype(int).tolist()):
                writer.writerow([name] + counts)
        return [f'held-out top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}% on {result.images} images',
                f'  confusion matrix: {os.path.join(folder, "confusion_matrix.png")} (.csv)']


class BatchMixup(Mixup):
    """timm's Mixup / CutMix with one mixing factor per batch, on batches of any size.

    Each image is mixed with its mirror in the batch (image ``i`` with image ``B - 1 - i``, targets
    alike), as timm's batch mode does; timm refuses odd batches, which a batch size of 1, an odd
    batch size or a batch with skipped files all give. Here the middle image of an odd batch is
    mixed with itself: it stays as it is and its target keeps its class (label smoothing still
    applies), so no image is dropped and a batch of one trains.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if self.mode != 'batch':
            return super().__call__(x, target)
        lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


class _ClassificationStep:
    """The loss of a classification batch: Mixup/CutMix with soft targets, or label smoothing."""

    def __init__(self, config: Dict, num_classes: int):
        self.channels_last = config['channels_last']
        self.mixup, self.loss_fn = None, torch.nn.CrossEntropyLoss()
        if config['mixup'] > 0 or config['cutmix'] > 0:
            self.mixup = BatchMixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'],
                                    label_smoothing=config['label_smoothing'], num_classes=num_classes)
            self.loss_fn = SoftTargetCrossEntropy()
        elif config['label_smoothing'] > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(config['label_smoothing'])

    def __call__(self, model, inputs, targets, device):
        x, y = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self.loss_fn(model(x), y), x.shape[0]


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
def evaluate_classifier(
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


def evaluate_folder(loaded, data: Optional[str], ctx, img_size: Optional[int] = None, batch_size: int = 64,
                    workers: int = 2) -> Tuple[EvalResult, List[str], Dict]:
    """Top-1/top-5 and per-class accuracy of a loaded classifier on a folder of class folders.

    Preprocessing is the model's pretrained_cfg: resize by crop_pct, center crop, mean/std
    normalisation (timm's eval transform).

    Args:
        loaded: the classifier, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        data: a folder of class folders, or a dataset root with ``val/``; None: the held-out embedded digits.
        ctx: the processes to evaluate on (:class:`~deformvit.runtime.DistributedContext`).
        img_size: evaluation resolution (default: the model's).

    Returns:
        ``(result, class names, data config)``.

    Raises:
        DatasetError: bad data, or another number of classes than the model predicts.
    """
    model = loaded.model
    data_cfg = resolve_data_config({'input_size': (3, img_size, img_size)} if img_size else {}, model=model)
    transform = create_transform(**data_cfg, is_training=False)
    if data is None:
        dataset = DigitsDataset('val', transform)
    else:
        dataset = ImageFolderDataset(validation_folder(data) or data, transform, classes=loaded.classes)
    if model.num_classes != len(dataset.classes):
        raise DatasetError(f'{loaded.source} predicts {model.num_classes} classes but the data has '
                           f'{len(dataset.classes)} class folders')
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_corrupt)
    return evaluate_classifier(model.to(ctx.device), loader, model.num_classes, ctx), list(dataset.classes), data_cfg


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: str, max_labels: int = 40) -> None:
    """Row-normalised confusion matrix (true classes as rows)."""
    Figure = optional('matplotlib.figure', 'The confusion matrix figure', package='matplotlib').Figure
    totals = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros_like(confusion, dtype=float), where=totals > 0)
    size = min(12, 3 + 0.35 * len(classes))
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap='Blues', vmin=0, vmax=1)
    if len(classes) <= max_labels:
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
        if len(classes) <= 12:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(j, i, int(confusion[i, j]), ha='center', va='center', fontsize=8,
                            color='white' if normalised[i, j] > 0.5 else 'black')
    ax.set(xlabel='predicted', ylabel='true', title='Confusion matrix (held out)')
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
