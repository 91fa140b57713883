"""Time the built-in job (`make demo` = `deformvit train` without --data) and report its accuracy.

    python benchmarks/train_digits.py [--model eapt_nano] [--epochs 12] [--output runs/bench-digits]

Prints wall time (start-up, data loading and evaluation included), epochs, throughput and the
held-out top-1 of the model (dat_nano by default, the demo's) on the 1,000 held-out embedded
MNIST digits, with the first and last epochs' training loss. Targets for the demo: under 5
minutes on 2 CPU cores and at least 95 % top-1.
"""
import argparse
import csv
import os
import shutil
import time

import torch

from deformvit.tasks import get_task
from deformvit.training import defaults, load_recipe, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default=None, help='registered model (default: the recipe\'s dat_nano)')
    parser.add_argument('--epochs', type=int, default=None, help='default: the recipe\'s')
    parser.add_argument('--output', default=os.path.join('runs', 'bench-digits'))
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    config = dict(defaults(get_task('classify')), **load_recipe('digits'), recipe='digits', output=args.output)
    config.update({k: v for k, v in (('model', args.model), ('epochs', args.epochs)) if v is not None})
    start = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - start
    with open(os.path.join(args.output, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    throughput = sum(float(r['images_per_s']) for r in rows) / len(rows)
    print(f"\nthreads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'job':<28}{'wall s':>8}{'epochs':>8}{'train img/s':>13}{'loss first/last':>18}"
          f"{'held-out top-1':>16}{'top-5':>8}")
    losses = f"{float(rows[0]['train_loss']):.3f}/{float(rows[-1]['train_loss']):.3f}"
    print(f"{config['model'] + ' / digits (32px)':<28}{seconds:>8.0f}{len(rows):>8}{throughput:>13.0f}{losses:>18}"
          f"{result['top1']:>15.2f}%{result['top5']:>7.2f}%")


if __name__ == '__main__':
    main()
