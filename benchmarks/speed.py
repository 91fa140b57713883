"""Inference throughput of DAT and EAPT against Swin Transformer, measured in one run.

    python benchmarks/speed.py                       # dat_tiny, eapt_small vs swin_tiny, batch 16, 224, CPU
    python benchmarks/speed.py --models dat_tiny swin_tiny_patch4_window7_224 --batch 16
    python benchmarks/speed.py --official-repo /path/to/DAT   # adds the official DAT-T

Models are timed in turns (round-robin) so that machine noise hits all of them alike; each
round runs every model once and the median over rounds is reported, with the ratio to the
last model listed (the reference, Swin-T by default).
"""
import argparse
import os
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deformvit  # noqa: E402,F401  (registers the models)


def official_dat_tiny(repo: str, configs: str) -> torch.nn.Module:
    import yaml
    from compare_official import build_official, import_official
    with open(configs) as f:
        config = yaml.safe_load(f)['dat_tiny']
    model = build_official(import_official(repo), config)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    return LogitsOnly(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['dat_tiny', 'eapt_small', 'swin_tiny_patch4_window7_224'],
                        help='timm model names; the last one is the reference of the ratio column')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--official-repo', help='checkout of the official DAT code: also time its DAT-T')
    parser.add_argument('--configs', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                                          'shared', 'reference', 'dat_official_v1_configs.yaml'))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    models = {name: timm.create_model(name) for name in args.models}
    if args.official_repo:
        models = {'dat_tiny (official)': official_dat_tiny(args.official_repo, args.configs), **models}
    models = {name: m.eval().to(device) for name, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def run(model):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for model in models.values():
                run(model)
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(run(model))

    reference = list(models)[-1]
    ref_median = statistics.median(times[reference])
    print(f'device={device} threads={torch.get_num_threads()} batch={args.batch} size={args.size} '
          f'rounds={args.rounds} torch={torch.__version__}')
    print(f"{'model':<34}{'median s/batch':>16}{'images/s':>12}{'vs ' + reference[:14]:>20}")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f'{name:<34}{median:>16.4f}{args.batch / median:>12.1f}{ref_median / median:>19.2f}x')


if __name__ == '__main__':
    main()
