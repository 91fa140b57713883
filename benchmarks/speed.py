"""Throughput, latency and memory of DAT and EAPT against timm references: ``deformvit bench``.

    python benchmarks/speed.py                                   # as deformvit bench
    python benchmarks/speed.py --models dat_tiny --references swin_tiny_patch4_window7_224 --rounds 7
    python benchmarks/speed.py --official-repo /path/to/DAT      # adds the official DAT-T

Takes every option of ``deformvit bench`` (``--rounds`` is ``--repeats``), plus
``--official-repo``, a checkout of the official DAT code whose DAT-T is measured in the same
round-robin as the others (see ``benchmarks/compare_official.py``).
"""
import argparse
import os
import sys

import torch
import yaml

from deformvit.cli import bench, reported

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare_official import build_official, import_official  # noqa: E402


class LogitsOnly(torch.nn.Module):
    """The official DAT returns ``(logits, positions, references)``; keep the logits."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


def official_dat_tiny(repo: str, configs: str) -> torch.nn.Module:
    with open(configs) as f:
        config = yaml.safe_load(f)['dat_tiny']
    return LogitsOnly(build_official(import_official(repo), config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    parser.add_argument('--rounds', type=int, dest='repeats', default=argparse.SUPPRESS, help='same as --repeats')
    parser.add_argument('--official-repo', help='checkout of the official DAT code: also measure its DAT-T')
    parser.add_argument('--configs', default=os.path.join(HERE, '..', '..', 'shared', 'reference',
                                                          'dat_official_v1_configs.yaml'),
                        help='the official model configurations (for --official-repo)')
    args = parser.parse_args()
    extra = {'dat_tiny (official)': official_dat_tiny(args.official_repo, args.configs)} if args.official_repo else None
    with reported('benchmarks/speed.py'):
        bench.run(args, extra_models=extra)


if __name__ == '__main__':
    main()
