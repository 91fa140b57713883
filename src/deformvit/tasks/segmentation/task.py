"""Semantic segmentation: ADE20K-layout data, the decoders of
:data:`~deformvit.tasks.segmentation.SEGMENTORS`, mIoU and predicted label maps.

Data is in the ADE20K layout (``images/{training,validation}`` and
``annotations/{training,validation}`` PNGs, annotation 0 ignored); class names come from
``classes.txt`` in the root or are ADE20K's 150. Without ``--data`` a run trains on the
embedded digit scenes (real MNIST digits composited at several scales, written in this
layout). Metrics: mIoU, mAcc, aAcc and per-class IoU at the annotations' resolution,
single-scale or multi-scale + flip (DAT Table 5's dagger column), with whole-image or
sliding-window inference.
"""
import contextlib
import csv
import os
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ...data import DatasetError
from ...data.ade import SegmentationFolder, SegmentationMetrics, collate_segmentation
from ..base import Evaluation
from ..dense import DenseTask, class_colors, predict_images, scenes_root
from . import SEGMENTORS, build_segmentor
from .inference import MULTI_SCALE_RATIOS, segment_logits

__all__ = ['SegmentationTask', 'evaluate_segmentor', 'predict']


class SegmentationTask(DenseTask):
    """Segmentors of :data:`~deformvit.tasks.segmentation.SEGMENTORS` on ADE20K-layout data."""
    name = 'segment'
    command = 'deformvit segment train'
    defaults = dict(
        decoder='upernet', backbone='dat_tiny', decoder_channels=None, fpn_channels=256, crop_size=[512, 512],
        scale=[2048, 512], ratio_range=[0.5, 2.0], hflip=0.5, photometric=True, reduce_zero_label=True,
        aux_weight=0.4, test_mode='whole', test_crop=[512, 512], test_stride=[341, 341], test_scales=[1.0],
        test_flip=False, eval_batch_size=1)
    recipes = ('seg-digits', 'seg-upernet-160k')
    metric_names = ('miou', 'macc', 'aacc')
    collate = staticmethod(collate_segmentation)
    flags = ('backbone', 'decoder', 'iterations')
    framework_field = 'decoder'
    frameworks = SEGMENTORS
    data_help = 'ADE20K-layout root (images/, annotations/, optional classes.txt)'

    def add_arguments(self, parser) -> None:
        super().add_arguments(parser)
        parser.add_argument('--iterations', type=int, help='optimizer updates (sets the number of epochs)')

    def datasets(self, config: Dict):
        root = scenes_root(config['data'], 'ade')
        common = dict(crop_size=tuple(config['crop_size']), scale=tuple(config['scale']),
                      reduce_zero_label=config['reduce_zero_label'])
        train = SegmentationFolder(root, 'training', train=True, ratio_range=tuple(config['ratio_range']),
                                   hflip=config['hflip'], photometric=config['photometric'], **common)
        val = SegmentationFolder(root, 'validation', classes=train.classes, train=False, **common)
        print(f'train: {train.summary()}\nval:   {val.summary()}', flush=True)
        return train, val

    def build_model(self, config: Dict, classes: List[str]):
        model = build_segmentor(config['decoder'], config['backbone'], len(classes),
                                pretrained_backbone=config['pretrained'], drop_path_rate=config['drop_path'],
                                channels=config['decoder_channels'], fpn_channels=config['fpn_channels'])
        kwargs = {k: v for k, v in model.config.items() if k != 'decoder'}
        return model, config['decoder'], kwargs

    def training_step(self, config: Dict, classes: List[str]):
        return partial(_segmentation_step, aux_weight=config['aux_weight'])

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
        return Evaluation({k: result[k] for k in self.metrics(config)}, images, skipped, detail=result)

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


def _segmentation_step(model, images, labels, device, aux_weight: float):
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    out = model(images)
    if isinstance(out, dict):
        return (F.cross_entropy(out['out'].float(), labels, ignore_index=255)
                + aux_weight * F.cross_entropy(out['aux'].float(), labels, ignore_index=255)), len(images)
    return F.cross_entropy(out.float(), labels, ignore_index=255), len(images)


def evaluate_segmentor(loaded, data: Optional[str], ctx, mode: str = 'whole', multi_scale: bool = False,
                       scale: Sequence[int] = (2048, 512), crop: Sequence[int] = (512, 512),
                       stride: Sequence[int] = (341, 341), workers: int = 2) -> Tuple[Evaluation, str]:
    """mIoU, mAcc and per-class IoU of a loaded segmentor on the validation split of ``data``.

    Args:
        loaded: the segmentor, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        data: ADE20K-layout root (default: the embedded scenes).
        ctx: the processes to evaluate on (:class:`~deformvit.runtime.DistributedContext`).
        mode: ``'whole'`` or ``'slide'`` inference (``crop`` windows ``stride`` apart).
        multi_scale: average the ratios of :data:`MULTI_SCALE_RATIOS` and their flips.
        scale: the test resize ``(long, short)``.

    Returns:
        ``(evaluation, root)``.

    Raises:
        DatasetError: bad data, or another number of classes than the segmentor's.
    """
    model, classes = loaded.model, loaded.classes
    root = scenes_root(data, 'ade')
    dataset = SegmentationFolder(root, 'validation', classes=classes if os.path.exists(
        os.path.join(root, 'classes.txt')) else None, train=False, scale=tuple(scale))
    if len(dataset.classes) != len(classes):
        raise DatasetError(f'{loaded.source} predicts {len(classes)} classes, the data has {len(dataset.classes)}')
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate_segmentation)
    config = dict(test_mode=mode, test_scales=MULTI_SCALE_RATIOS if multi_scale else (1.0,), test_flip=multi_scale,
                  test_crop=crop, test_stride=stride)
    return SegmentationTask().evaluate(model.to(ctx.device), loader, ctx, contextlib.nullcontext, config), root


@torch.no_grad()
def predict(loaded, inputs: Sequence[str], output: str, scale: Sequence[int] = (2048, 512), mode: str = 'whole',
            multi_scale: bool = False, device: str = 'cpu') -> Dict:
    """Segment images; write ``<name>.png`` (class indices), ``<name>_overlay.png`` and ``classes.json``.

    Args:
        loaded: the segmentor, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        inputs: image files or folders.
        output: the folder written.
        scale: the resize ``(long, short)`` before inference.
        mode: ``'whole'`` or ``'slide'`` inference.
        multi_scale: average the ratios of :data:`MULTI_SCALE_RATIOS` and their flips.
        device: where the model runs.
    """
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    model, classes = loaded.model.to(device), loaded.classes
    palette = torch.tensor(class_colors(len(classes)), dtype=torch.uint8)

    def segment(path, image, stem):
        x = TF.pil_to_tensor(image).float().div(255)
        ratio = min(max(scale) / max(x.shape[-2:]), min(scale) / min(x.shape[-2:]))
        size = [max(32, round(s * ratio)) for s in x.shape[-2:]]
        inp = TF.normalize(TF.resize(x, size, antialias=True), list(model.mean), list(model.std))[None].to(device)
        probabilities = segment_logits(model, inp, x.shape[-2:], mode, MULTI_SCALE_RATIOS if multi_scale else (1.0,),
                                       multi_scale)
        labels = probabilities.argmax(1)[0].cpu()
        Image.fromarray(labels.to(torch.uint8).numpy()).save(os.path.join(output, f'{stem}.png'))
        overlay = (0.5 * x * 255 + 0.5 * palette[labels].permute(2, 0, 1).float()).to(torch.uint8)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(os.path.join(output, f'{stem}_overlay.png'))
        counts = torch.bincount(labels.flatten(), minlength=len(classes))
        return dict(file=path, classes={classes[i]: round(float(counts[i]) / labels.numel(), 4)
                                        for i in counts.nonzero().flatten().tolist()})

    return predict_images(inputs, output, segment, 'classes.json', dict(checkpoint=loaded.source, classes=classes))
