"""``deformvit detect``: train, evaluate and run RetinaNet / Faster R-CNN / Mask R-CNN.

Data is COCO-format (an images folder plus an instances JSON; ``--data ROOT`` with
``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json``, or the
same with ``train``/``val``). Without ``--data`` a run trains on the embedded digit scenes
(real MNIST digits composited at several scales, written in COCO layout). Metrics are
COCO's (pycocotools): box AP, AP50, AP75, APs/APm/APl and, for Mask R-CNN, mask AP.
"""
import argparse
import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchvision.models.detection import MaskRCNN

from ..data import DatasetError
from .base import Evaluation, Task, add_train_command, class_colors, guarded, iter_images
from .coco import CocoDetection, coco_evaluate, coco_layout, collate_detection, to_coco_results
from .detectors import DETECTORS, build_detector

__all__ = ['DetectionTask', 'draw_detections', 'main', 'predict']

BOX_METRICS = ('box_ap', 'box_ap50', 'box_ap75', 'box_aps', 'box_apm', 'box_apl')
MASK_METRICS = ('mask_ap', 'mask_ap50', 'mask_ap75', 'mask_aps', 'mask_apm', 'mask_apl')


def _layout(config: Dict) -> Dict:
    if config['data'] is not None:
        return coco_layout(config['data'])
    from .synthetic import default_scenes_root, write_digit_scenes
    return coco_layout(write_digit_scenes(default_scenes_root())['coco'])


@dataclass
class DetectionTask(Task):
    """Detectors of :mod:`deformvit.tasks.detectors` on COCO-format data."""
    name: str = 'detect'
    command: str = 'deformvit detect train'
    defaults: Dict = field(default_factory=lambda: dict(
        detector='mask_rcnn', backbone='dat_tiny', min_size=800, max_size=1333, fpn_channels=256,
        anchor_sizes=[32, 64, 128, 256, 512], representation_size=1024, hflip=0.5, detector_kwargs={}, eval_batch_size=2))
    flags: tuple = ('backbone', 'detector')
    metrics: tuple = BOX_METRICS
    model_field: str = 'backbone'

    def default_recipe(self, data: Optional[str]) -> str:
        return 'det-digits' if data is None else 'det-1x'

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument('--detector', choices=DETECTORS)

    def datasets(self, config: Dict):
        layout = _layout(config)
        masks = config['detector'] == 'mask_rcnn'
        self.metrics = BOX_METRICS + (MASK_METRICS if masks else ())
        train = CocoDetection(*layout['train'], train=True, with_masks=masks, hflip=config['hflip'])
        val = CocoDetection(*layout['val'], train=False, with_masks=masks)
        if val.classes != train.classes:
            raise DatasetError(f'the train and val annotations name different categories: {train.classes[:10]} vs '
                               f'{val.classes[:10]}; expected the same categories in both')
        print(f'train: {train.summary()}\nval:   {val.summary()}', flush=True)
        return train, val

    def collate(self, batch):
        return collate_detection(batch)

    def build_model(self, config: Dict, classes: List[str]):
        model = build_detector(
            config['detector'], config['backbone'], len(classes), pretrained_backbone=config['pretrained'],
            drop_path_rate=config['drop_path'], min_size=config['min_size'], max_size=config['max_size'],
            fpn_channels=config['fpn_channels'], anchor_sizes=config['anchor_sizes'],
            representation_size=config['representation_size'], **config['detector_kwargs'])
        kwargs = {k: v for k, v in model.config.items() if k != 'detector'}
        return model, config['detector'], kwargs

    def step(self, model, images, targets, device):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), len(images)

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
        iou_types = ('bbox', 'segm') if any(m.startswith('mask') for m in self.metrics) else ('bbox',)
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
    return draw_bounding_boxes(canvas, prediction['boxes'][keep], text, colors=colors, width=2)


@torch.no_grad()
def predict(checkpoint: str, inputs: Sequence[str], output: str, score_threshold: float = 0.5,
            device: str = 'cpu') -> Dict:
    """Detect objects in images; write ``<name>.png`` drawings and ``detections.json`` into ``output``."""
    from torchvision.io import write_png
    from torchvision.transforms.v2.functional import pil_to_tensor
    from . import load_checkpoint
    model, classes, _ = load_checkpoint(checkpoint, task='detect')
    model.to(device)
    os.makedirs(output, exist_ok=True)
    records, unreadable = [], []
    for path, image in iter_images(inputs):
        if image is None:
            unreadable.append(path)
            continue
        x = pil_to_tensor(image).float().div(255)
        prediction = {k: v.cpu() for k, v in model([x.to(device)])[0].items()}
        keep = prediction['scores'] >= score_threshold
        name = os.path.splitext(os.path.basename(path))[0]
        write_png(draw_detections(x, prediction, classes, score_threshold), os.path.join(output, f'{name}.png'))
        records.append(dict(file=path, width=image.width, height=image.height, detections=[
            dict(label=classes[int(label) - 1], score=round(float(score), 4),
                 box_xyxy=[round(float(v), 2) for v in box])
            for box, label, score in zip(prediction['boxes'][keep], prediction['labels'][keep],
                                         prediction['scores'][keep])]))
    with open(os.path.join(output, 'detections.json'), 'w') as f:
        json.dump(dict(checkpoint=checkpoint, score_threshold=score_threshold, images=records,
                       unreadable=unreadable), f, indent=1)
    return dict(images=records, unreadable=unreadable)


def _evaluate_command(args: argparse.Namespace) -> Dict:
    from torch.utils.data import DataLoader
    from ..engine import init_distributed
    from . import load_checkpoint
    ctx = init_distributed(args.device)
    model, classes, _ = load_checkpoint(args.checkpoint, task='detect')
    layout = _layout(dict(data=args.data))
    with_masks = isinstance(model, MaskRCNN)
    dataset = CocoDetection(*layout['val'], train=False, with_masks=with_masks)
    if dataset.classes != classes:
        raise DatasetError(f'{args.checkpoint} detects {len(classes)} classes {classes[:10]}, the annotations name '
                           f'{len(dataset.classes)}: {dataset.classes[:10]}')
    task = DetectionTask(metrics=BOX_METRICS + (MASK_METRICS if with_masks else ()))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_detection)
    evaluation = task.evaluate(model.to(ctx.device), loader, ctx, contextlib.nullcontext, {})
    m = evaluation.metrics
    print(f'{args.checkpoint} on {evaluation.images} images of {layout["val"][0]}'
          + (f' ({evaluation.skipped} unreadable skipped)' if evaluation.skipped else ''))
    for prefix in ('box', 'mask') if with_masks else ('box',):
        print(f'  {prefix:4s} AP {m[prefix + "_ap"]:5.2f}  AP50 {m[prefix + "_ap50"]:5.2f}  AP75 {m[prefix + "_ap75"]:5.2f}'
              f'  APs {m[prefix + "_aps"]:5.2f}  APm {m[prefix + "_apm"]:5.2f}  APl {m[prefix + "_apl"]:5.2f}')
    print('per-class box AP:')
    for name, ap in zip(classes, m['box_ap_per_class']):
        print(f'  {name:<24} {ap:6.2f}')
    return m


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest='action', required=True)
    add_train_command(commands, DetectionTask, 'train a detector (no --data: the embedded digit scenes)', __doc__,
                      'COCO root (train2017/, val2017/, annotations/instances_*.json)')
    eval_parser = commands.add_parser('eval', help='COCO box/mask AP of a checkpoint')
    eval_parser.add_argument('checkpoint', help='last.safetensors / best.safetensors of a detection run')
    eval_parser.add_argument('--data', help='COCO root; default: the embedded digit scenes')
    eval_parser.add_argument('--batch-size', type=int, default=2)
    eval_parser.add_argument('--workers', type=int, default=2)
    eval_parser.add_argument('--device', default='auto')
    eval_parser.set_defaults(func=guarded(_evaluate_command, 'deformvit detect eval'))
    predict_parser = commands.add_parser('predict', help='draw detections on images and write detections.json')
    predict_parser.add_argument('checkpoint')
    predict_parser.add_argument('inputs', nargs='+', help='image files or folders')
    predict_parser.add_argument('--output', default='detections', help='folder for the PNGs and detections.json')
    predict_parser.add_argument('--score-threshold', type=float, default=0.5)
    predict_parser.add_argument('--device', default='cpu')
    predict_parser.set_defaults(func=guarded(
        lambda a: _report_predictions(predict(a.checkpoint, a.inputs, a.output, a.score_threshold, a.device), a.output),
        'deformvit detect predict'))


def _report_predictions(result: Dict, output: str) -> None:
    for record in result['images']:
        found = ', '.join(f"{d['label']} {d['score']:.2f}" for d in record['detections']) or 'nothing'
        print(f"{record['file']}: {found}")
    if result['unreadable']:
        print(f"skipped {len(result['unreadable'])} unreadable file(s): {', '.join(result['unreadable'][:5])}")
    print(f'drawings and detections.json in {output}')


def main(args: argparse.Namespace) -> None:
    args.func(args)
