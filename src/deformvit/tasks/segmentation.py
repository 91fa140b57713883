"""``deformvit segment``: train, evaluate and run Semantic FPN / UperNet.

Data is in the ADE20K layout (``images/{training,validation}`` and
``annotations/{training,validation}`` PNGs, annotation 0 ignored); class names come from
``classes.txt`` in the root or are ADE20K's 150. Without ``--data`` a run trains on the
embedded digit scenes (real MNIST digits composited at several scales, written in this
layout). Metrics: mIoU, mAcc, aAcc and per-class IoU at the annotations' resolution,
single-scale or multi-scale + flip (DAT Table 5's dagger column), with whole-image or
sliding-window inference.
"""
import argparse
import contextlib
import csv
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import DatasetError
from .ade import SegmentationFolder, SegmentationMetrics, collate_segmentation
from .base import Evaluation, Task, add_train_command, class_colors, guarded, iter_images
from .segmentors import DECODERS, build_segmentor

__all__ = ['MULTI_SCALE_RATIOS', 'SegmentationTask', 'predict', 'segment_logits']

MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's ADE20K multi-scale test


def _sliding_logits(model: nn.Module, x: torch.Tensor, num_classes: int, crop: Sequence[int],
                    stride: Sequence[int]) -> torch.Tensor:
    """Logits of overlapping ``crop`` windows, ``stride`` apart, averaged where they overlap."""
    _, _, h, w = x.shape
    crop_h, crop_w = min(crop[0], h), min(crop[1], w)
    rows = max(h - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - crop_w + stride[1] - 1, 0) // stride[1] + 1
    logits = x.new_zeros(x.shape[0], num_classes, h, w)
    counts = x.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            top, left = min(r * stride[0], h - crop_h), min(c * stride[1], w - crop_w)  # the last windows end at the border
            logits[:, :, top:top + crop_h, left:left + crop_w] += model(x[:, :, top:top + crop_h, left:left + crop_w])
            counts[:, :, top:top + crop_h, left:left + crop_w] += 1
    return logits / counts


@torch.no_grad()
def segment_logits(
        model: nn.Module,
        x: torch.Tensor,
        out_size: Sequence[int],
        mode: str = 'whole',
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
) -> torch.Tensor:
    """Class probabilities ``(B, K, *out_size)`` of normalised images ``x`` (B, 3, h, w).

    Args:
        model: a segmentor in eval mode (logits at its input size).
        out_size: resolution of the result (the annotation's).
        mode: ``'whole'`` (one pass over the image) or ``'slide'`` (``crop`` windows ``stride`` apart).
        scales: the image is resized by each ratio (bilinear) and the softmax outputs averaged.
        flip: also average the horizontally flipped image's outputs.
    """
    if mode not in ('whole', 'slide'):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    probabilities = None
    for scale in scales:
        size = [max(32, round(s * scale)) for s in x.shape[-2:]]
        scaled = x if scale == 1.0 else F.interpolate(x, size=size, mode='bilinear', align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inp = scaled.flip(-1) if flipped else scaled
            logits = model(inp) if mode == 'whole' else _sliding_logits(model, inp, model.num_classes, crop, stride)
            logits = logits.flip(-1) if flipped else logits
            p = F.interpolate(logits.float(), size=tuple(out_size), mode='bilinear', align_corners=False).softmax(1)
            probabilities = p if probabilities is None else probabilities + p
    return probabilities / (len(scales) * (2 if flip else 1))


def _ade_root(config: Dict) -> str:
    if config['data'] is not None:
        return config['data']
    from .synthetic import default_scenes_root, write_digit_scenes
    return write_digit_scenes(default_scenes_root())['ade']


@dataclass
class SegmentationTask(Task):
    """Segmentors of :mod:`deformvit.tasks.segmentors` on ADE20K-layout data."""
    name: str = 'segment'
    command: str = 'deformvit segment train'
    defaults: Dict = field(default_factory=lambda: dict(
        decoder='upernet', backbone='dat_tiny', decoder_channels=None, fpn_channels=256, crop_size=[512, 512], scale=[2048, 512],
        ratio_range=[0.5, 2.0], hflip=0.5, photometric=True, reduce_zero_label=True, aux_weight=0.4,
        test_mode='whole', test_crop=[512, 512], test_stride=[341, 341], test_scales=[1.0], test_flip=False,
        eval_batch_size=1))
    flags: tuple = ('backbone', 'decoder', 'iterations')
    metrics: tuple = ('miou', 'macc', 'aacc')
    model_field: str = 'backbone'

    def default_recipe(self, data: Optional[str]) -> str:
        return 'seg-digits' if data is None else 'seg-upernet-160k'

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument('--decoder', choices=DECODERS)
        parser.add_argument('--iterations', type=int, help='optimizer updates (sets the number of epochs)')

    def datasets(self, config: Dict):
        root = _ade_root(config)
        common = dict(crop_size=tuple(config['crop_size']), scale=tuple(config['scale']),
                      reduce_zero_label=config['reduce_zero_label'])
        train = SegmentationFolder(root, 'training', train=True, ratio_range=tuple(config['ratio_range']),
                                   hflip=config['hflip'], photometric=config['photometric'], **common)
        val = SegmentationFolder(root, 'validation', classes=train.classes, train=False, **common)
        print(f'train: {train.summary()}\nval:   {val.summary()}', flush=True)
        return train, val

    def collate(self, batch):
        return collate_segmentation(batch)

    def build_model(self, config: Dict, classes: List[str]):
        self.aux_weight = config['aux_weight']
        model = build_segmentor(config['decoder'], config['backbone'], len(classes),
                                pretrained_backbone=config['pretrained'], drop_path_rate=config['drop_path'],
                                channels=config['decoder_channels'], fpn_channels=config['fpn_channels'])
        kwargs = {k: v for k, v in model.config.items() if k != 'decoder'}
        return model, config['decoder'], kwargs

    def step(self, model, images, labels, device):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        out = model(images)
        if isinstance(out, dict):
            return (F.cross_entropy(out['out'].float(), labels, ignore_index=255)
                    + self.aux_weight * F.cross_entropy(out['aux'].float(), labels, ignore_index=255)), len(images)
        return F.cross_entropy(out.float(), labels, ignore_index=255), len(images)

    @torch.no_grad()
    def evaluate(self, model, loader, ctx, autocast, config) -> Evaluation:
        model.eval()
        metrics = SegmentationMetrics(len(loader.dataset.classes))
        metrics.confusion = metrics.confusion.to(ctx.device)
        images, skipped = 0, 0
        for batch, labels, n_skipped in loader:
            skipped += n_skipped
            if batch is None:
                continue
            if torch.is_tensor(batch):
                batch, labels = list(batch), list(labels)
            for image, label in zip(batch, labels):
                with autocast():
                    probabilities = segment_logits(
                        model, image[None].to(ctx.device), label.shape[-2:], config['test_mode'],
                        config['test_scales'], config['test_flip'], config['test_crop'], config['test_stride'])
                metrics.update(probabilities.argmax(1)[0], label.to(ctx.device))
                images += 1
        if ctx.distributed:
            dist.all_reduce(metrics.confusion)
            images, skipped = (int(v) for v in ctx.all_reduce_sum([images, skipped]))
        result = metrics.compute()
        return Evaluation({k: result[k] for k in self.metrics}, images, skipped, detail=result)

    def describe(self, evaluation: Evaluation) -> str:
        m = evaluation.metrics
        return f"mIoU {m['miou']:.2f}, mAcc {m['macc']:.2f}, aAcc {m['aacc']:.2f}"

    def reports(self, folder, rows, evaluation, classes):
        path = os.path.join(folder, 'per_class_iou.csv')
        with open(path, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['class', 'iou', 'acc'])
            for name, iou, acc in zip(classes, evaluation.detail['iou'], evaluation.detail['acc']):
                writer.writerow([name, f'{iou:.3f}', f'{acc:.3f}'])
        m = evaluation.metrics
        return [f"held-out mIoU {m['miou']:.2f}, mAcc {m['macc']:.2f}, aAcc {m['aacc']:.2f} on {evaluation.images} "
                'images', f'  per-class IoU:    {path}']


@torch.no_grad()
def predict(checkpoint: str, inputs: Sequence[str], output: str, scale: Sequence[int] = (2048, 512),
            mode: str = 'whole', multi_scale: bool = False, device: str = 'cpu') -> Dict:
    """Segment images; write ``<name>.png`` (class indices), ``<name>_overlay.png`` and ``classes.json``."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    from . import load_checkpoint
    model, classes, _ = load_checkpoint(checkpoint, task='segment')
    model.to(device)
    palette = torch.tensor(class_colors(len(classes)), dtype=torch.uint8)
    os.makedirs(output, exist_ok=True)
    records, unreadable = [], []
    for path, image in iter_images(inputs):
        if image is None:
            unreadable.append(path)
            continue
        x = TF.pil_to_tensor(image).float().div(255)
        ratio = min(max(scale) / max(x.shape[-2:]), min(scale) / min(x.shape[-2:]))
        size = [max(32, round(s * ratio)) for s in x.shape[-2:]]
        inp = TF.normalize(TF.resize(x, size, antialias=True), list(model.mean), list(model.std))[None].to(device)
        probabilities = segment_logits(model, inp, x.shape[-2:], mode, MULTI_SCALE_RATIOS if multi_scale else (1.0,),
                                       multi_scale)
        labels = probabilities.argmax(1)[0].cpu()
        name = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(labels.to(torch.uint8).numpy()).save(os.path.join(output, f'{name}.png'))
        overlay = (0.5 * x * 255 + 0.5 * palette[labels].permute(2, 0, 1).float()).to(torch.uint8)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(os.path.join(output, f'{name}_overlay.png'))
        counts = torch.bincount(labels.flatten(), minlength=len(classes))
        records.append(dict(file=path, classes={classes[i]: round(float(counts[i]) / labels.numel(), 4)
                                                for i in counts.nonzero().flatten().tolist()}))
    with open(os.path.join(output, 'classes.json'), 'w') as f:
        json.dump(dict(checkpoint=checkpoint, classes=classes, images=records, unreadable=unreadable), f, indent=1)
    return dict(images=records, unreadable=unreadable)


def _evaluate_command(args: argparse.Namespace) -> Dict:
    from torch.utils.data import DataLoader
    from ..engine import init_distributed
    from . import load_checkpoint
    ctx = init_distributed(args.device)
    model, classes, _ = load_checkpoint(args.checkpoint, task='segment')
    root = _ade_root(dict(data=args.data))
    dataset = SegmentationFolder(root, 'validation', classes=classes if os.path.exists(
        os.path.join(root, 'classes.txt')) else None, train=False, scale=tuple(args.scale))
    if len(dataset.classes) != len(classes):
        raise DatasetError(f'{args.checkpoint} predicts {len(classes)} classes, the data has {len(dataset.classes)}')
    loader = DataLoader(dataset, batch_size=1, num_workers=args.workers, collate_fn=collate_segmentation)
    config = dict(test_mode=args.mode, test_scales=MULTI_SCALE_RATIOS if args.multi_scale else (1.0,),
                  test_flip=args.multi_scale, test_crop=args.crop, test_stride=args.stride)
    task = SegmentationTask()
    evaluation = task.evaluate(model.to(ctx.device), loader, ctx, contextlib.nullcontext, config)
    protocol = ('multi-scale + flip' if args.multi_scale else 'single-scale') + f', {args.mode} inference'
    print(f'{args.checkpoint} on {evaluation.images} images of {root} ({protocol})'
          + (f', {evaluation.skipped} unreadable skipped' if evaluation.skipped else ''))
    print(f'  {task.describe(evaluation)}')
    print('per-class IoU / accuracy:')
    for name, iou, acc in zip(classes, evaluation.detail['iou'], evaluation.detail['acc']):
        print(f'  {name:<24} {iou:6.2f} {acc:6.2f}')
    return evaluation.metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest='action', required=True)
    add_train_command(commands, SegmentationTask, 'train a segmentor (no --data: the embedded digit scenes)', __doc__,
                      'ADE20K-layout root (images/, annotations/, optional classes.txt)')
    eval_parser = commands.add_parser('eval', help='mIoU, mAcc and per-class IoU of a checkpoint')
    eval_parser.add_argument('checkpoint', help='last.safetensors / best.safetensors of a segmentation run')
    eval_parser.add_argument('--data', help='ADE20K-layout root; default: the embedded digit scenes')
    eval_parser.add_argument('--multi-scale', action='store_true', help='ratios 0.5-1.75 and flips, averaged')
    eval_parser.add_argument('--mode', choices=['whole', 'slide'], default='whole')
    eval_parser.add_argument('--scale', type=int, nargs=2, default=[2048, 512], help='test resize (long, short)')
    eval_parser.add_argument('--crop', type=int, nargs=2, default=[512, 512], help='sliding window size')
    eval_parser.add_argument('--stride', type=int, nargs=2, default=[341, 341], help='sliding window stride')
    eval_parser.add_argument('--workers', type=int, default=2)
    eval_parser.add_argument('--device', default='auto')
    eval_parser.set_defaults(func=guarded(_evaluate_command, 'deformvit segment eval'))
    predict_parser = commands.add_parser('predict', help='write label maps and overlays of images')
    predict_parser.add_argument('checkpoint')
    predict_parser.add_argument('inputs', nargs='+', help='image files or folders')
    predict_parser.add_argument('--output', default='segmentations')
    predict_parser.add_argument('--mode', choices=['whole', 'slide'], default='whole')
    predict_parser.add_argument('--multi-scale', action='store_true')
    predict_parser.add_argument('--scale', type=int, nargs=2, default=[2048, 512])
    predict_parser.add_argument('--device', default='cpu')
    predict_parser.set_defaults(func=guarded(
        lambda a: _report(predict(a.checkpoint, a.inputs, a.output, a.scale, a.mode, a.multi_scale, a.device),
                          a.output), 'deformvit segment predict'))


def _report(result: Dict, output: str) -> None:
    for record in result['images']:
        top = sorted(record['classes'].items(), key=lambda kv: -kv[1])[:5]
        print(f"{record['file']}: " + ', '.join(f'{name} {share:.0%}' for name, share in top))
    if result['unreadable']:
        print(f"skipped {len(result['unreadable'])} unreadable file(s): {', '.join(result['unreadable'][:5])}")
    print(f'label maps, overlays and classes.json in {output}')
