"""``deformvit demo``: classify a real photo with DAT-T and show what its deformable attention
samples.

Runs on CPU in seconds: it loads a photo shipped with scikit-image (or ``--image``),
preprocesses it with timm's eval transform, prints the top-5 classes, the four feature maps
(the ``features_only`` pyramid) and the deformed sampling points of one deformable block.
Without ``--checkpoint`` the weights are random, so the classes are arbitrary; the shapes and
sampling mechanics are the real ones.
"""
import argparse
from typing import List, Optional

import numpy as np
import timm
import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from . import models  # noqa: F401  (registers the models)
from .visualize import load_image

__all__ = ['main', 'load_image']


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='deformvit demo', description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='dat_tiny', help='registered DAT model (default: dat_tiny)')
    parser.add_argument('--image', help='image file (default: a photo shipped with scikit-image)')
    parser.add_argument('--checkpoint', help='official DAT release file or converted .safetensors')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights')


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint)) if args.checkpoint else {}
    model = timm.create_model(args.model, **kwargs).eval()
    config = resolve_data_config({}, model=model)
    try:
        image = load_image(args.image)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'deformvit demo: {err}') from err
    x = create_transform(**config)(image).unsqueeze(0)
    source = args.image or 'scikit-image sample photo "chelsea" (a cat)'
    weights = args.checkpoint or f'random (seed {args.seed}); the predicted classes are arbitrary'
    print(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, weights: {weights}')
    print(f'image: {source}, {image.size[0]}x{image.size[1]} -> input {tuple(x.shape)}')

    logits, records = model.forward_sampling_points(x)
    probs = logits.softmax(-1)[0]
    info = ImageNetInfo()
    print('top-5 classes:')
    for p, i in zip(*probs.topk(5)):
        print(f'  {i.item():4d} {info.index_to_description(i.item()):<40} {p.item():.4f}')

    print('feature maps (features_only / forward_intermediates, NCHW):')
    for info_, feat in zip(model.feature_info, model.forward_intermediates(x, intermediates_only=True)):
        print(f"  {info_['module']}: {tuple(feat.shape)}  stride {info_['reduction']}")

    record = records[-1]
    _, groups, hk, wk, _ = record.points.shape
    points = record.to_pixels('points')[0]
    offsets = points - record.to_pixels('reference')[0]
    print(f'deformable block stages.{record.stage}.blocks.{record.block}: {groups} offset groups x {hk}x{wk} '
          f'reference points over its {record.feature_size[0]}x{record.feature_size[1]} input map (stride {record.stride})')
    print(f'  offsets in input pixels: mean |dy|={offsets[..., 0].abs().mean():.2f}, '
          f'mean |dx|={offsets[..., 1].abs().mean():.2f}, max={offsets.abs().max():.2f}')
    print('  first deformed points of group 0 as (y, x) input pixels:')
    print('   ', '  '.join(f'({py:.1f}, {px:.1f})' for py, px in np.asarray(points[0, 0, :4])))


if __name__ == '__main__':
    main()
