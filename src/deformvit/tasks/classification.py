"""Image classification: ImageNet-style folders or the embedded digits, timm's augmentation."""
import csv
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import timm
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..data import DigitsDataset, ImageFolderDataset, collate_skipping_corrupt, validation_folder
from ..engine import evaluate
from .base import Evaluation, Task

__all__ = ['ClassificationTask']


@dataclass
class ClassificationTask(Task):
    """``deformvit train``: timm's transforms, Mixup/CutMix, label smoothing; top-1/top-5."""
    name: str = 'classify'
    command: str = 'deformvit train'
    defaults: Dict = field(default_factory=lambda: dict(
        model='dat_tiny', img_size=224, label_smoothing=0.1, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0,
        hflip=0.5, scale=[0.08, 1.0], augment=True))
    flags: tuple = ('model', 'img_size')
    metrics: tuple = ('top1', 'top5', 'val_loss')

    def default_recipe(self, data: Optional[str]) -> str:
        return 'digits' if data is None else 'dat-in1k'

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

    def collate(self, batch):
        return collate_skipping_corrupt(batch)

    def build_model(self, config: Dict, classes: List[str]):
        kwargs = dict(num_classes=len(classes), drop_path_rate=config['drop_path'], img_size=config['img_size'])
        if config['pretrained']:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=config['pretrained']))
        try:
            model = timm.create_model(config['model'], **kwargs)
        except TypeError:  # a timm model without img_size
            kwargs.pop('img_size')
            model = timm.create_model(config['model'], **kwargs)
        self.channels_last = config['channels_last']
        self.mixup, self.loss_fn = None, torch.nn.CrossEntropyLoss()
        if config['mixup'] > 0 or config['cutmix'] > 0:
            self.mixup = Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'],
                               label_smoothing=config['label_smoothing'], num_classes=len(classes))
            self.loss_fn = SoftTargetCrossEntropy()
        elif config['label_smoothing'] > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(config['label_smoothing'])
        file_kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay',
                                                                    'drop_path_rate')}
        return model, config['model'], file_kwargs

    def step(self, model, inputs, targets, device):
        x, y = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            if x.shape[0] % 2:  # timm's Mixup pairs images: a batch made odd by skipped files loses one
                x, y = x[:-1], y[:-1]
                if not x.shape[0]:
                    return None, 0
            x, y = self.mixup(x, y)
        return self.loss_fn(model(x), y), x.shape[0]

    def evaluate(self, model, loader, ctx, autocast, config) -> Evaluation:
        result = evaluate(model, loader, len(loader.dataset.classes), ctx, autocast, config['channels_last'])
        return Evaluation(dict(top1=result.top1, top5=result.top5, val_loss=result.loss), result.images,
                          result.skipped, result)

    def describe(self, evaluation: Evaluation) -> str:
        m = evaluation.metrics
        return f"val loss {m['val_loss']:.4f}, top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%"

    def reports(self, folder, rows, evaluation, classes):
        from ..reports import plot_confusion_matrix
        result = evaluation.detail
        plot_confusion_matrix(result.confusion, classes, os.path.join(folder, 'confusion_matrix.png'))
        with open(os.path.join(folder, 'confusion_matrix.csv'), 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['true\\predicted'] + classes)
            for name, counts in zip(classes, result.confusion.astype(int).tolist()):
                writer.writerow([name] + counts)
        return [f'held-out top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}% on {result.images} images',
                f'  confusion matrix: {os.path.join(folder, "confusion_matrix.png")} (.csv)']
