"""``deformvit demo``: classify a photo and show the deformed sampling points of a block."""
import argparse
from typing import List

import torch

from ..tasks import load_model
from ..tools import demo
from ..tools.visualize import load_image
from .common import non_negative_int

__all__ = ['DESCRIPTION', 'add_arguments', 'run']

DESCRIPTION = demo.__doc__


def run(args: argparse.Namespace) -> List[str]:
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, args.checkpoint, task='classify')
    image = load_image(args.image)
    weights = loaded.weights if args.checkpoint else f'random (seed {args.seed}); the predicted classes are arbitrary'
    lines = demo.demo_report(loaded.model, args.model, weights, image,
                             args.image or 'scikit-image sample photo "chelsea" (a cat)', loaded.classes)
    print('\n'.join(lines))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='dat_tiny', help='registered DAT or EAPT model (default: dat_tiny)')
    parser.add_argument('--image', help='image file (default: a photo shipped with scikit-image)')
    parser.add_argument('--checkpoint', help="'official' (the model's official ImageNet weights, downloaded once), "
                                             'an official release file, converted .safetensors or a training '
                                             'checkpoint')
    parser.add_argument('--seed', type=non_negative_int, default=0, help='seed of the random weights')
