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
from ...data.common import check_sides
from ..base import POSITIVE_INT, PROBABILITY, Evaluation, Limit
from ..dense import DenseTask, class_colors, predict_images, scenes_root
from . import SEGMENTORS, build_segmentor
from .inference import MULTI_SCALE_RATIOS, check_inference, segment_logits

__all__ = ['SegmentationTask', 'evaluate_segmentor', 'predict']

IGNORE_INDEX = 255  # label of the pixels no loss or metric counts (SegmentationFolder's default)


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
    limits = dict(decoder_channels=Limit(1, integer=True, optional=True), fpn_channels=POSITIVE_INT,
                  crop_size=Limit(1, integer=True, count=2), scale=Limit(1, integer=True, count=2),
                  ratio_range=Limit(0, open_low=True, count=2), hflip=PROBABILITY, aux_weight=Limit(0),
                  test_mode=Limit(choices=('whole', 'slide')), test_crop=Limit(1, integer=True, count=2),
                  test_stride=Limit(1, integer=True, count=2), test_scales=Limit(0, open_low=True, count=0),
                  eval_batch_size=POSITIVE_INT)
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


def _labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged over the ``labelled`` pixels, as ``F.cross_entropy(..., ignore_index=255)``,
    but 0 rather than NaN (0 / 0) when there are none; the 0 still depends on every logit."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction='sum')
    return total / labelled.clamp_min(1)


def _segmentation_step(model, images, labels, device, aux_weight: float):
    """Loss of a batch of training crops, and the number of crops with a labelled pixel.

    A batch whose crops hold no labelled pixel (a random crop of an unlabelled region) gives a loss
    of 0 with zero gradients, not NaN, and counts 0 images in the epoch's mean loss: its backward
    pass still runs, so every process of a DDP run takes part in the same gradient reductions and
    the update schedule is the one of any other batch.
    """
    labelled_crops = int((labels != IGNORE_INDEX).flatten(1).any(1).sum())  # on the host, before the copy
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    labelled = (labels != IGNORE_INDEX).sum()
    out = model(images)
    if isinstance(out, dict):
        return (_labelled_cross_entropy(out['out'], labels, labelled)
                + aux_weight * _labelled_cross_entropy(out['aux'], labels, labelled)), labelled_crops
    return _labelled_cross_entropy(out, labels, labelled), labelled_crops


def evaluate_segmentor(loaded, data: Optional[str], ctx, mode: str = 'whole', multi_scale: bool = False,
                       scale: Sequence[int] = (2048, 512), crop: Sequence[int] = (512, 512),
                       stride: Sequence[int] = (341, 341), workers: int = 2) -> Tuple[Evaluation, str]:
    """mIoU, mAcc and per-class IoU of a loaded segmentor on the validation split of ``data``.

    Args:
        loaded: the segmentor, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        data: ADE20K-layout root (default: the embedded scenes); only ``images/validation`` and
            ``annotations/validation`` are needed.
        ctx: the processes to evaluate on (:class:`~deformvit.runtime.DistributedContext`).
        mode: ``'whole'`` or ``'slide'`` inference (``crop`` windows ``stride`` apart).
        multi_scale: average the ratios of :data:`MULTI_SCALE_RATIOS` and their flips.
        scale: the test resize ``(long, short)``.
        crop, stride: ``(height, width)`` of the sliding windows and the step between them.

    Returns:
        ``(evaluation, root)``.

    Raises:
        UsageError: an unknown ``mode``, or a ``scale``, ``crop`` or ``stride`` that is not two
            positive whole numbers (checked before any data is read).
        DatasetError: bad data, or another number of classes than the segmentor's.
    """
    check_sides('scale', scale, 'the (long, short) sides of the test resize, e.g. (2048, 512)')
    check_inference(mode, crop, stride)
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
    """Segment images; write per image a label map (class indices) and an overlay PNG, and ``classes.json``.

    The outputs of ``photos/a/x.jpg`` given as ``photos`` are ``output/a/x.png`` and
    ``output/a/x_overlay.png``: they mirror the inputs' paths
    (:func:`~deformvit.tasks.dense.output_names`), and ``x.jpg`` beside ``x.png`` keeps its extension
    (``x.jpg.png``). ``output`` may be neither an input folder nor inside one. Images that cannot be
    read are skipped and listed with the reason in ``classes.json`` (see
    :func:`~deformvit.tasks.dense.predict_images`); an image thinner than 32 pixels is stretched to 32
    for the model and its label map resized back.

    Args:
        loaded: the segmentor, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        inputs: image files or folders.
        output: the folder written.
        scale: the resize ``(long, short)`` before inference.
        mode: ``'whole'`` or ``'slide'`` inference.
        multi_scale: average the ratios of :data:`MULTI_SCALE_RATIOS` and their flips.
        device: where the model runs.

    Returns:
        ``{'images', 'skipped'}`` of :func:`~deformvit.tasks.dense.predict_images`; each
        image's record holds ``classes``, the share of its pixels given to each class found.

    Raises:
        UsageError: an unknown ``mode``, a ``scale`` that is not two positive whole numbers, or ``output``
            among the inputs (before any work).
    """
    check_sides('scale', scale, 'the (long, short) sides of the resize, e.g. (2048, 512)')
    check_inference(mode)
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    model, classes = loaded.model.to(device), loaded.classes
    palette = torch.tensor(class_colors(len(classes)), dtype=torch.uint8)

    def segment(image, files):
        x = TF.pil_to_tensor(image).float().div(255)
        ratio = min(max(scale) / max(x.shape[-2:]), min(scale) / min(x.shape[-2:]))
        size = [max(32, round(s * ratio)) for s in x.shape[-2:]]
        inp = TF.normalize(TF.resize(x, size, antialias=True), list(model.mean), list(model.std))[None].to(device)
        probabilities = segment_logits(model, inp, x.shape[-2:], mode, MULTI_SCALE_RATIOS if multi_scale else (1.0,),
                                       multi_scale)
        labels = probabilities.argmax(1)[0].cpu()
        Image.fromarray(labels.to(torch.uint8).numpy()).save(files[0])
        overlay = (0.5 * x * 255 + 0.5 * palette[labels].permute(2, 0, 1).float()).to(torch.uint8)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(files[1])
        counts = torch.bincount(labels.flatten(), minlength=len(classes))
        return dict(classes={classes[i]: round(float(counts[i]) / labels.numel(), 4)
                             for i in counts.nonzero().flatten().tolist()})

    return predict_images(inputs, output, segment, ('.png', '_overlay.png'), 'classes.json',
                          dict(checkpoint=loaded.source, classes=classes))
