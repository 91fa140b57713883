"""deformvit eval: top-1 / top-5 and per-class accuracy of a checkpoint on a folder.

Preprocessing is the model's pretrained_cfg: resize by crop_pct, center crop, mean/std
normalisation (timm's eval transform).
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional

import timm
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader

from . import models  # noqa: F401  (registers the models)
from .checkpoint import UnsafeCheckpointError, read_safetensors_metadata
from .data import DatasetError, DigitsDataset, ImageFolderDataset, collate_skipping_corrupt, validation_folder
from .engine import evaluate, init_distributed

__all__ = ['add_arguments', 'load_model', 'main']


def load_model(checkpoint: str, model_name: Optional[str] = None, **overrides) -> tuple:
    """Rebuild a model from a deformvit training checkpoint (or any file with ``model_name``).

    Returns:
        ``(model, classes)``; ``classes`` is None when the file does not record them.
    """
    metadata: Dict[str, str] = {}
    if checkpoint.endswith('.safetensors') and os.path.isfile(checkpoint):
        metadata = read_safetensors_metadata(checkpoint)
    name = model_name or metadata.get('architecture')
    if not name:
        raise ValueError(f'{checkpoint} does not record its architecture; pass --model NAME')
    kwargs = dict(json.loads(metadata.get('model_kwargs', '{}')), **overrides)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint), **kwargs)
    classes = json.loads(metadata['classes']) if 'classes' in metadata else None
    return model, classes


def _dataset(data: Optional[str], transform, classes):
    if data is None:
        return DigitsDataset('val', transform)
    return ImageFolderDataset(validation_folder(data) or data, transform, classes=classes)


def run(args: argparse.Namespace) -> Dict:
    ctx = init_distributed(args.device)
    overrides = {'img_size': args.img_size} if args.img_size else {}
    model, classes = load_model(args.checkpoint, args.model, **overrides)
    data_cfg = resolve_data_config({'input_size': (3, args.img_size, args.img_size)} if args.img_size else {},
                                   model=model)
    dataset = _dataset(args.data, create_transform(**data_cfg, is_training=False), classes)
    if model.num_classes != len(dataset.classes):
        raise DatasetError(f'{args.checkpoint} predicts {model.num_classes} classes but the data has '
                           f'{len(dataset.classes)} class folders')
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate_skipping_corrupt)
    result = evaluate(model.to(ctx.device), loader, model.num_classes, ctx)
    print(f'{args.checkpoint}: top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%, loss {result.loss:.4f} '
          f'on {result.images} images' + (f' ({result.skipped} unreadable images skipped)' if result.skipped else ''))
    print(f'preprocessing: resize {data_cfg["interpolation"]} with crop_pct {data_cfg["crop_pct"]}, center crop '
          f'{data_cfg["input_size"][1:]}, mean {data_cfg["mean"]}, std {data_cfg["std"]}')
    print('per-class accuracy:')
    for name, acc in zip(dataset.classes, result.per_class):
        print(f'  {name:<24} {acc:6.2f}%')
    return dict(top1=result.top1, top5=result.top5, per_class=dict(zip(dataset.classes, result.per_class)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='a training checkpoint (.safetensors) or weights file with --model')
    parser.add_argument('--data', help='folder of class folders, or a dataset root with val/; default: the '
                                       'held-out embedded digits')
    parser.add_argument('--model', help='architecture, when the file does not record it')
    parser.add_argument('--img-size', type=int, help='evaluation resolution (default: the model\'s)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--device', default='auto')


def main(args: argparse.Namespace) -> None:
    try:
        run(args)
    except (DatasetError, ValueError, FileNotFoundError, UnsafeCheckpointError) as err:
        print(f'deformvit eval: {err}', file=sys.stderr)
        raise SystemExit(1) from err
