"""Object detection and instance segmentation: COCO-format data, the frameworks of
:data:`~deformvit.tasks.detection.DETECTORS`, COCO metrics and drawn predictions.

Data is COCO-format (an images folder plus an instances JSON; ``--data ROOT`` with
``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json``, or the
same with ``train``/``val``; evaluation needs only the val split). Without ``--data`` a run
trains on the embedded digit scenes (real MNIST digits composited at several scales, written
in COCO layout). Metrics are COCO's (pycocotools): box AP, AP50, AP75, APs/APm/APl and, for
frameworks with masks (Mask R-CNN, Cascade Mask R-CNN, HTC), mask AP. HTC trains its semantic
branch on COCO-stuff maps in ``ROOT/stuffthingmaps/`` when they are there (the scenes have them).
"""
import contextlib
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ...data import DatasetError
from ...errors import UsageError
from ...data.coco import (CocoDetection, coco_evaluate, coco_layout, coco_semantic_dir, collate_detection,
                          to_coco_results)
from ..base import POSITIVE_INT, PROBABILITY, Evaluation, Limit
from ..dense import DenseTask, class_colors, predict_images, scenes_root
from . import DETECTORS, build_detector, detector_class

__all__ = ['BOX_METRICS', 'MASK_METRICS', 'DetectionTask', 'draw_detections', 'evaluate_detector', 'predict']

BOX_METRICS = ('box_ap', 'box_ap50', 'box_ap75', 'box_aps', 'box_apm', 'box_apl')
MASK_METRICS = ('mask_ap', 'mask_ap50', 'mask_ap75', 'mask_aps', 'mask_apm', 'mask_apl')


def _metrics(masks: bool) -> Tuple[str, ...]:
    return BOX_METRICS + (MASK_METRICS if masks else ())


class DetectionTask(DenseTask):
    """Detectors of :data:`~deformvit.tasks.detection.DETECTORS` on COCO-format data."""
    name = 'detect'
    command = 'deformvit detect train'
    defaults = dict(
        detector='mask_rcnn', backbone='dat_tiny', min_size=800, max_size=1333, fpn_channels=256,
        anchor_sizes=None, representation_size=1024, hflip=0.5, crop=0.0, detector_kwargs={}, backbone_kwargs={},
        eval_batch_size=2)
    recipes = ('det-digits', 'det-1x')
    collate = staticmethod(collate_detection)
    flags = ('backbone', 'detector')
    limits = dict(min_size=Limit(1, integer=True, or_list=True), max_size=POSITIVE_INT, fpn_channels=POSITIVE_INT,
                  anchor_sizes=Limit(1, integer=True, count=5, optional=True), representation_size=POSITIVE_INT,
                  hflip=PROBABILITY, crop=PROBABILITY, eval_batch_size=POSITIVE_INT)
    framework_field = 'detector'
    frameworks = DETECTORS
    data_help = 'COCO root (train2017/, val2017/, annotations/instances_*.json)'

    def check_config(self, config: Dict) -> None:
        super().check_config(config)
        detector_class(config['detector']).check_options(config['detector_kwargs'])

    def metrics(self, config: Dict) -> Tuple[str, ...]:
        return _metrics(detector_class(config['detector']).has_masks())

    def datasets(self, config: Dict):
        root = scenes_root(config['data'], 'coco')
        layout = coco_layout(root)
        framework = detector_class(config['detector'])
        masks = framework.has_masks()
        semantic_dir = None
        if framework.uses_semantic_maps(config['detector_kwargs']):
            semantic_dir = coco_semantic_dir(root, 'train')
            if semantic_dir is None:
                print(f"{config['detector']}: no semantic maps under {root}/stuffthingmaps/; the semantic branch "
                      f"trains without its loss", flush=True)
        train = CocoDetection(*layout['train'], train=True, with_masks=masks, hflip=config['hflip'],
                              semantic_dir=semantic_dir, crop=config['crop'])
        val = CocoDetection(*layout['val'], train=False, with_masks=masks)
        if val.classes != train.classes:
            raise DatasetError(f'the train and val annotations name different categories: {train.classes[:10]} vs '
                               f'{val.classes[:10]}; expected the same categories in both')
        print(f'train: {train.summary()}\nval:   {val.summary()}', flush=True)
        return train, val

    def build_model(self, config: Dict, classes: List[str]):
        model = build_detector(
            config['detector'], config['backbone'], len(classes), pretrained_backbone=config['pretrained'],
            drop_path_rate=config['drop_path'], min_size=config['min_size'], max_size=config['max_size'],
            fpn_channels=config['fpn_channels'], anchor_sizes=config['anchor_sizes'],
            representation_size=config['representation_size'], backbone_kwargs=config['backbone_kwargs'],
            **config['detector_kwargs'])
        kwargs = {k: v for k, v in model.config.items() if k != 'detector'}
        return model, config['detector'], kwargs

    def training_step(self, config: Dict, classes: List[str]):
        return _detection_step

    @torch.no_grad()
    def evaluate(self, model, loader, ctx, autocast, config) -> Evaluation:
        model.eval()
        dataset = loader.dataset
        results, images, skipped = [], 0, 0
        for batch, targets, n_skipped in loader:
            skipped += n_skipped
            if batch is None:
                continue
            with autocast():
                outputs = model([image.to(ctx.device) for image in batch])
            for target, output in zip(targets, outputs):
                output = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in output.items()}
                results.extend(to_coco_results(target['image_id'], output, dataset.category_ids))
            images += len(batch)
        if ctx.distributed:
            gathered = [None] * ctx.world_size
            dist.all_gather_object(gathered, (results, images, skipped))
            results = [r for part in gathered for r in part[0]]
            images, skipped = sum(p[1] for p in gathered), sum(p[2] for p in gathered)
        if not ctx.is_main:
            return Evaluation({}, images, skipped)
        iou_types = ('bbox', 'segm') if model.has_masks() else ('bbox',)
        metrics = coco_evaluate(dataset.coco, results, iou_types, image_ids=dataset.ids)
        return Evaluation(metrics, images, skipped, detail=dict(results=results, classes=dataset.classes))

    def describe(self, evaluation: Evaluation) -> str:
        m = evaluation.metrics
        text = f"box AP {m['box_ap']:.1f} (AP50 {m['box_ap50']:.1f}, AP75 {m['box_ap75']:.1f})"
        if 'mask_ap' in m:
            text += f", mask AP {m['mask_ap']:.1f}"
        return text

    def reports(self, folder, rows, evaluation, classes):
        per_class = evaluation.metrics.get('box_ap_per_class', [])
        path = os.path.join(folder, 'per_class_ap.csv')
        with open(path, 'w') as f:
            f.write('class,box_ap\n' + ''.join(f'{name},{ap:.3f}\n' for name, ap in zip(classes, per_class)))
        m = evaluation.metrics
        return [f"held-out box AP {m['box_ap']:.2f}, AP50 {m['box_ap50']:.2f}, AP75 {m['box_ap75']:.2f}, "
                f"APs/APm/APl {m['box_aps']:.1f}/{m['box_apm']:.1f}/{m['box_apl']:.1f}"
                + (f", mask AP {m['mask_ap']:.2f}" if 'mask_ap' in m else '') + f' on {evaluation.images} images',
                f'  per-class AP:     {path}']


def _detection_step(model, images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    losses = model(images, targets)
    return sum(losses.values()), len(images)


def evaluate_detector(loaded, data: Optional[str], ctx, batch_size: int = 2, workers: int = 2
                      ) -> Tuple[Evaluation, str]:
    """COCO box (and mask) AP of a loaded detector on the val split of ``data`` (default: the embedded scenes).

    Args:
        loaded: the detector, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        data: COCO root; only its val split (``val2017/`` or ``val/`` with its instances JSON) is
            needed, a root without training data is fine.
        ctx: the processes to evaluate on (:class:`~deformvit.runtime.DistributedContext`).

    Returns:
        ``(evaluation, images folder)``.

    Raises:
        DatasetError: bad data, or categories other than the detector's.
    """
    model, classes = loaded.model, loaded.classes
    layout = coco_layout(scenes_root(data, 'coco'), splits=('val',))
    dataset = CocoDetection(*layout['val'], train=False, with_masks=model.has_masks())
    if dataset.classes != classes:
        raise DatasetError(f'{loaded.source} detects {len(classes)} classes {classes[:10]}, the annotations name '
                           f'{len(dataset.classes)}: {dataset.classes[:10]}')
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
    evaluation = DetectionTask().evaluate(model.to(ctx.device), loader, ctx, contextlib.nullcontext, {})
    return evaluation, layout['val'][0]


def draw_detections(image: torch.Tensor, prediction: Dict, classes: Sequence[str], score_threshold: float = 0.5):
    """``image`` (3, H, W) in [0, 1] with the boxes, labels, scores and masks above ``score_threshold`` drawn in."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    keep = prediction['scores'] >= score_threshold
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    palette = class_colors(len(classes) + 1)  # labels count from 1
    colors = [palette[int(label)] for label in prediction['labels'][keep]]
    if 'masks' in prediction and keep.any():
        canvas = draw_segmentation_masks(canvas, prediction['masks'][keep, 0] > 0.5, alpha=0.45, colors=colors)
    text = [f'{classes[int(label) - 1]} {score:.2f}' for label, score in
            zip(prediction['labels'][keep], prediction['scores'][keep])]
    if not keep.any():  # nothing to draw: the image as it is
        return canvas
    return draw_bounding_boxes(canvas, prediction['boxes'][keep], text, colors=colors, width=2)


def _input_size(transform, height: int, width: int) -> Tuple[int, int]:
    """``(height, width)`` that torchvision's ``GeneralizedRCNNTransform`` resizes an evaluation image to
    (shorter side ``min_size[-1]``, longer at most ``max_size``), with its float32 scale and floor."""
    if transform.fixed_size is not None:
        return transform.fixed_size[1], transform.fixed_size[0]
    sides = torch.tensor([height, width], dtype=torch.float32)
    scale = torch.min(float(transform.min_size[-1]) / sides.min(), float(transform.max_size) / sides.max()).item()
    return math.floor(height * scale), math.floor(width * scale)


def _too_thin(model) -> Callable:
    """``unusable(image)`` of :func:`~deformvit.tasks.dense.predict_images` for ``model``: why an image is
    too thin to detect in (a side resized to 0 pixels, which torchvision's resize cannot make), or None."""
    def unusable(image) -> Optional[str]:
        height, width = _input_size(model.transform, image.height, image.width)
        if min(height, width) >= 1:
            return None
        return (f'too thin to detect in: {image.width}x{image.height} pixels (width x height) become '
                f'{width}x{height} at the detector\'s input size (shorter side {model.transform.min_size[-1]}, '
                f'longer side at most {model.transform.max_size}); expected a longer side at most '
                f'{model.transform.max_size} times the shorter one')
    return unusable


@torch.no_grad()
def predict(loaded, inputs: Sequence[str], output: str, score_threshold: float = 0.5, device: str = 'cpu') -> Dict:
    """Detect objects in images; write a PNG drawing per image and ``detections.json`` into ``output``.

    The drawing of ``photos/a/x.jpg`` given as ``photos`` is ``output/a/x.png``: outputs mirror the
    inputs' paths (:func:`~deformvit.tasks.dense.output_names`), and ``x.jpg`` beside ``x.png`` keeps its
    extension (``x.jpg.png``). ``output`` may be neither an input folder nor inside one. Images that cannot
    be read, or so thin that the detector's resize leaves a side of 0 pixels, are skipped and listed with
    the reason in ``detections.json`` (see :func:`~deformvit.tasks.dense.predict_images`).

    Args:
        loaded: the detector, its classes and source (:class:`~deformvit.tasks.LoadedModel`).
        inputs: image files or folders.
        output: the folder written.
        score_threshold: detections below it are neither drawn nor listed; in [0, 1].
        device: where the model runs.

    Returns:
        ``{'images', 'skipped'}`` of :func:`~deformvit.tasks.dense.predict_images`; each
        image's record holds ``width``, ``height`` and ``detections`` (``label``, ``score``, ``box_xyxy``).

    Raises:
        UsageError: ``score_threshold`` outside [0, 1], or ``output`` among the inputs (before any work).
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise UsageError(f'score_threshold {score_threshold} is outside [0, 1]; expected the lowest detection '
                         f'score to keep, e.g. 0.5')
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
    model, classes = loaded.model.to(device), loaded.classes

    def detect(image, files):
        x = pil_to_tensor(image).float().div(255)
        prediction = {k: v.cpu() for k, v in model([x.to(device)])[0].items()}
        keep = prediction['scores'] >= score_threshold
        to_pil_image(draw_detections(x, prediction, classes, score_threshold)).save(files[0])
        return dict(width=image.width, height=image.height, detections=[
            dict(label=classes[int(label) - 1], score=round(float(score), 4),
                 box_xyxy=[round(float(v), 2) for v in box])
            for box, label, score in zip(prediction['boxes'][keep], prediction['labels'][keep],
                                         prediction['scores'][keep])])

    return predict_images(inputs, output, detect, ('.png',), 'detections.json',
                          dict(checkpoint=loaded.source, score_threshold=score_threshold), unusable=_too_thin(model))
