"""Compare deformvit's DAT with the official DAT v1 implementation on the same weights.

The official code is not part of deformvit: point ``--official-repo`` at a checkout of
LeapLabTHU/DAT (the CVPR 2022 release; the folder holding ``models/dat.py``). The official
models are built from ``dat_official_v1_configs.yaml`` with random weights (position tables
and offset networks scaled up so that they matter), saved in the release format
``{'model': state_dict}``, loaded through ``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` and both are run on the same input.

    python benchmarks/compare_official.py --official-repo /path/to/DAT
    python benchmarks/compare_official.py --official-repo /path/to/DAT --write-fixture tests/fixtures

Prints, per model, the largest relative logit error, the largest sampling-point error and
both forward times. ``--write-fixture`` writes the small release-format checkpoint, input
and official outputs that ``tests/test_dat_official.py`` checks against.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import types

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = os.path.join(HERE, '..', '..', 'shared', 'reference', 'dat_official_v1_configs.yaml')

# A small model of the release layout: every block type, offset groups > 1, two deformable stages.
FIXTURE_CONFIG = dict(
    img_size=224, num_classes=10, dim_stem=16, dims=[16, 32, 64, 128], depths=[2, 2, 2, 2],
    stage_spec=[['L', 'S'], ['L', 'S'], ['L', 'D'], ['L', 'D']], heads=[1, 2, 4, 8], groups=[-1, -1, 2, 4],
    window_sizes=[7, 7, 7, 7], use_pes=[False, False, True, True], strides=[-1, -1, 1, 1],
    offset_range_factor=[-1, -1, 2, 2], drop_path_rate=0.0)
FIXTURE_OURS = dict(
    num_classes=10, embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), groups=(1, 1, 2, 4))


def import_official(repo: str):
    """Import ``models/dat.py`` of an official checkout as a package without running its __init__."""
    package = types.ModuleType('dat_release')
    package.__path__ = [os.path.join(repo, 'models')]
    sys.modules['dat_release'] = package
    return importlib.import_module('dat_release.dat')


def build_official(module, config: dict) -> torch.nn.Module:
    config = dict(config, drop_path_rate=0.0)
    return module.DAT(**config).eval()


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights with position tables and offsets large enough to change the output."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if 'rpe_table' in name or 'relative_position_bias_table' in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif 'conv_offset.3' in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif 'norm' in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith('weight')
                    else 0.1 * torch.randn(p.shape, generator=gen))


def structured_input(batch: int, size: int) -> torch.Tensor:
    """A deterministic, image-like input that needs no random generator."""
    ys = torch.linspace(-1, 1, size)[:, None]
    xs = torch.linspace(-1, 1, size)[None, :]
    channels = [torch.sin(3 * xs + 2 * ys), torch.cos(5 * xs * ys), torch.sin(7 * (xs ** 2 + ys ** 2))]
    x = torch.stack(channels)[None].repeat(batch, 1, 1, 1)
    return x * torch.linspace(0.5, 1.5, batch)[:, None, None, None]


def timed(fn, x, repeats=2):
    fn(x)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(x)
    return out, (time.perf_counter() - start) / repeats


def compare(module, name: str, config: dict, batch: int, seed: int, ours_kwargs=None) -> dict:
    import timm
    import deformvit  # noqa: F401  (registers the models)

    official = build_official(module, config)
    randomise(official, seed)
    size = config['img_size']
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{name}.pth')
        torch.save({'model': official.state_dict()}, path)
        ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **(ours_kwargs or {}))
    ours.eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        (ref_logits, ref_pos, _), t_official = timed(official, x)
        logits, t_ours = timed(ours, x)
        _, records = ours.forward_sampling_points(x)
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    ref_points = [p for stage in ref_pos for p in stage if p is not None]
    point_err = max((r.points - p).abs().max().item() for r, p in zip(records, ref_points))
    return dict(model=name, size=size, rel_logit_err=rel, point_err=point_err, n_deformable=len(records),
                official_s=t_official, ours_s=t_ours)


def write_fixture(module, folder: str, seed: int = 0) -> None:
    official = build_official(module, FIXTURE_CONFIG)
    randomise(official, seed)
    x = structured_input(2, FIXTURE_CONFIG['img_size'])
    with torch.no_grad():
        logits, positions, references = official(x)
    os.makedirs(folder, exist_ok=True)
    torch.save({'model': official.state_dict()}, os.path.join(folder, 'dat_official_mini.pth'))
    points = [p.tolist() for stage in positions for p in stage if p is not None]
    refs = [r.tolist() for stage in references for r in stage if r is not None]
    with open(os.path.join(folder, 'dat_official_mini.json'), 'w') as f:
        json.dump(dict(official_config=FIXTURE_CONFIG, deformvit_kwargs=FIXTURE_OURS, batch=2,
                       logits=logits.tolist(), points=points, references=refs), f)
    print(f'wrote {folder}/dat_official_mini.pth and .json ({sum(p.numel() for p in official.parameters())} params)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--official-repo', required=True, help='checkout of the official DAT code (holds models/dat.py)')
    parser.add_argument('--configs', default=DEFAULT_CONFIGS, help='dat_official_v1_configs.yaml')
    parser.add_argument('--models', nargs='+', default=['dat_tiny', 'dat_small', 'dat_base', 'dat_base_384'])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--write-fixture', metavar='FOLDER', help='also write the test fixture into FOLDER')
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    module = import_official(args.official_repo)
    if args.write_fixture:
        write_fixture(module, args.write_fixture, args.seed)
    with open(args.configs) as f:
        configs = yaml.safe_load(f)
    print(f"{'model':<14}{'input':>7}{'max rel. logit err':>20}{'max point err':>15}{'official s':>12}{'ours s':>9}{'speed-up':>10}")
    for name in args.models:
        r = compare(module, name, configs[name], args.batch, args.seed)
        print(f"{r['model']:<14}{r['size']:>7}{r['rel_logit_err']:>20.2e}{r['point_err']:>15.2e}"
              f"{r['official_s']:>12.3f}{r['ours_s']:>9.3f}{r['official_s'] / r['ours_s']:>9.2f}x")


if __name__ == '__main__':
    main()
