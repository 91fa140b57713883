"""Time the built-in job (`make demo` = `deformvit train` without --data) and report its accuracy.

    python benchmarks/train_digits.py [--output runs/bench-digits]

Prints wall time (start-up, data loading and evaluation included), epochs, throughput and the
held-out top-1 of dat_nano on the 1,000 held-out embedded MNIST digits. Targets: under 5
minutes on 2 CPU cores and at least 95 % top-1.
"""
import argparse
import csv
import os
import shutil
import time

import torch

from deformvit.train import DEFAULTS, load_recipe, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default=os.path.join('runs', 'bench-digits'))
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    config = dict(DEFAULTS, **load_recipe('digits'), recipe='digits', output=args.output)
    start = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - start
    with open(os.path.join(args.output, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    throughput = sum(float(r['images_per_s']) for r in rows) / len(rows)
    print(f"\nthreads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'job':<28}{'wall s':>8}{'epochs':>8}{'train img/s':>13}{'held-out top-1':>16}{'top-5':>8}")
    print(f"{'dat_nano / digits (32px)':<28}{seconds:>8.0f}{len(rows):>8}{throughput:>13.0f}"
          f"{result['top1']:>15.2f}%{result['top5']:>7.2f}%")


if __name__ == '__main__':
    main()
