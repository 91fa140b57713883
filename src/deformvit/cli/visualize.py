"""``deformvit visualize``: the papers' figures on any image and checkpoint."""
import argparse
from typing import List

import torch

from ..checkpoint import check_output_folder
from ..runtime import resolve_device
from ..tasks import load_model
from ..tools import visualize
from ..tools.visualize import EDGE_SAMPLES, FIGURES, SAMPLE_PHOTOS, load_image
from .common import non_negative_int, positive_int

__all__ = ['DESCRIPTION', 'add_arguments', 'run']

DESCRIPTION = visualize.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--figure', nargs='+', choices=(*FIGURES, 'all'), default=['all'],
                        help='figures to draw (default: all that apply to the model)')
    parser.add_argument('--model', help='registered model (default: the checkpoint\'s architecture, else dat_tiny, '
                                        'or eapt_small when only eapt-* figures are asked for)')
    parser.add_argument('--checkpoint', help="'official' (the model's official weights, downloaded once), an "
                                             'official release file, converted .safetensors, or a deformvit '
                                             'classification training checkpoint (default: random weights)')
    parser.add_argument('--seed', type=non_negative_int, default=0, help='seed of the random weights (default: 0)')
    parser.add_argument('--image', help='image file (default: the scikit-image photo --sample)')
    parser.add_argument('--sample', default='chelsea', choices=SAMPLE_PHOTOS,
                        help='scikit-image photo used without --image (default: chelsea)')
    parser.add_argument('--size', type=positive_int, help='input side (default: the model\'s input size)')
    parser.add_argument('--stage', type=non_negative_int,
                        help='0-based stage: sampling-points and key-importance use its last deformable block, '
                             'query-keys too; eapt-* draw only this stage')
    parser.add_argument('--block', type=non_negative_int, help='0-based block within --stage (a deformable block)')
    parser.add_argument('--group', type=non_negative_int,
                        help='offset group to draw (default: 0 for sampling-points, all groups for key-importance '
                             'and query-keys)')
    parser.add_argument('--head', type=non_negative_int, help='attention head (default: the mean over heads)')
    parser.add_argument('--query', type=float, nargs=2, metavar=('X', 'Y'),
                        help='query pixel (column, row) of the displayed input for query-keys (default: the centre)')
    parser.add_argument('--top-k', type=positive_int, default=32,
                        help='keys drawn by key-importance and query-keys (default: 32)')
    parser.add_argument('--reduction', choices=('norm', 'mean'), default='norm',
                        help='channel reduction of eapt-heatmaps (default: L2 norm)')
    parser.add_argument('--edge-samples', type=positive_int, default=EDGE_SAMPLES,
                        help=f'values per window edge in eapt-edges (default: {EDGE_SAMPLES}, as in EAPT)')
    parser.add_argument('--output', '-o', default='visualizations',
                        help='output folder, created if missing (default: visualizations)')
    parser.add_argument('--device', default='cpu', help='torch device (default: cpu)')


def run(args: argparse.Namespace) -> List[str]:
    """Draw the figures the command line asks for and print the written paths."""
    eapt_only = all(f.startswith('eapt-') for f in args.figure)
    check_output_folder(args.output)
    resolve_device(args.device)
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, args.checkpoint, task='classify', default='eapt_small' if eapt_only else 'dat_tiny')
    weights = loaded.weights if args.checkpoint else f'random weights (seed {args.seed}), untrained'
    image = load_image(args.image, args.sample)
    written = visualize.draw_figures(
        loaded.model, loaded.architecture, weights, image, args.image or f'scikit-image "{args.sample}"',
        args.output, args.figure, args.size, args.stage, args.block, args.group, args.head, args.query, args.top_k,
        args.reduction, args.edge_samples, args.device)
    for path in written:
        print(path)
    return written
