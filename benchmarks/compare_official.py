"""Compare deformvit's DAT and DAT++ with the official implementations on the same weights.

The official code is not part of deformvit: point ``--official-repo`` at a checkout of
LeapLabTHU/DAT (the folder holding ``models/dat.py``). The official models are built from the
official configurations with random weights (position tables, offset networks and, for DAT++,
the neighborhood-attention biases scaled up so that they matter), saved in the release format
``{'model': state_dict}``, loaded through ``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` and both are run on the same input.

``--release v1`` (default): the CVPR 2022 release, ``dat_official_v1_configs.yaml``, models
``dat_tiny`` ... ``dat_base_384``.

``--release datpp``: the DAT++ release on the repository's main branch (``models/dat.py`` and
``models/nat.py`` at b580702, ``models/dat_blocks.py`` at 2f31405), ``datpp_official_configs.yaml``,
models ``datpp_tiny`` ... ``datpp_base_384``, each compared at its evaluation size and at 256x320.
The official ``models/nat.py`` imports natten 0.14, a compiled extension that no longer builds
against current torch: **natten is replaced by an in-memory stand-in** (``natten`` / ``natten.functional``
modules put in ``sys.modules``) whose ``natten2dqkrpb`` / ``natten2dav`` (and the
``NATTEN2DQKRPBFunction`` / ``NATTEN2DAVFunction`` classes nat.py calls) gather each query's
``k x k`` neighbours with :func:`deformvit.layers.neighborhood.neighborhood_indices`; it is
checked against :func:`deformvit.layers.neighborhood.neighborhood_attention_reference` before
use. The DAT++ comparison therefore tests everything but natten's own kernels. The official
files also import ``einops`` (``pip install einops`` or put it on ``PYTHONPATH``); a checkout
without ``models/slide.py`` / ``models/qna.py`` (block kinds no released model uses) gets
placeholders for them.

    python benchmarks/compare_official.py --official-repo /path/to/DAT-v1
    python benchmarks/compare_official.py --official-repo /path/to/DAT-v1 --write-fixture tests/fixtures
    python benchmarks/compare_official.py --release datpp --official-repo /path/to/DAT-main
    python benchmarks/compare_official.py --release datpp --official-repo /path/to/DAT-main --write-fixture DIR

Prints, per model and input size, the largest relative logit error, the largest sampling-point
error and both forward times. ``--write-fixture`` writes the small release-format checkpoint,
input and official outputs that ``tests/test_dat_official.py`` (v1: ``dat_official_mini.*``)
or ``tests/test_datpp.py`` (datpp: ``datpp_official_mini.*``) check against.
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
REFERENCE = os.path.join(HERE, '..', '..', 'shared', 'reference')
DEFAULT_CONFIGS = os.path.join(REFERENCE, 'dat_official_v1_configs.yaml')
DATPP_CONFIGS = os.path.join(REFERENCE, 'datpp_official_configs.yaml')

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
    importlib.import_module('deformvit')  # registers the models with timm

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


# --------------------------------------------------------------------------------------------
# DAT++ (main branch of LeapLabTHU/DAT)
# --------------------------------------------------------------------------------------------

DATPP_MODELS = ['datpp_tiny', 'datpp_small', 'datpp_base', 'datpp_base_384']
DATPP_EXTRA_SIZE = (256, 320)
# The fixture: a narrow DAT-T++ with every block kind ('N', 'D'; both orders), 10 classes.
DATPP_FIXTURE_BASE = 'datpp_tiny'
DATPP_FIXTURE_OVERRIDES = dict(
    dim_stem=16, dims=[16, 32, 64, 128], depths=[2, 2, 2, 1], stage_spec=[['N', 'D'], ['N', 'D'], ['D', 'N'], ['D']],
    heads=[1, 2, 4, 8], groups=[1, 1, 2, 4], num_classes=10)
DATPP_FIXTURE_OURS = dict(
    embed_dims=[16, 32, 64, 128], stage_spec=['ND', 'ND', 'DN', 'D'], num_heads=[1, 2, 4, 8], groups=[1, 1, 2, 4],
    num_classes=10)
DATPP_FIXTURE_INPUTS = ((0, [2, 3, 224, 224]), (1, [1, 3, 80, 112]))


class _NattenFunction:
    """``torch.autograd.Function``-like holder: nat.py calls ``NATTEN2D...Function.apply(...)``."""
    fn = None

    @classmethod
    def apply(cls, *args):
        return cls.fn(*args)


def _neighbour_index(height: int, width: int, kernel_size: int, dilation: int, device):
    """Flat key index ``(H, W, k, k)`` and bias rows / columns, natten's neighbour order ``ky * k + kx``."""
    from deformvit.layers.neighborhood import neighborhood_indices

    row_keys, row_bias = neighborhood_indices(height, kernel_size, dilation, device)  # (H, k)
    col_keys, col_bias = neighborhood_indices(width, kernel_size, dilation, device)  # (W, k)
    keys = row_keys[:, None, :, None] * width + col_keys[None, :, None, :]  # (H, W, k, k)
    return keys, row_bias[:, None, :, None], col_bias[None, :, None, :]


def natten2dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb, kernel_size: int, dilation: int) -> torch.Tensor:
    """natten 0.14 ``natten2dqkrpb``: ``(B, heads, H, W, k*k)`` logits ``q . k + rpb`` over each query's window."""
    batch, heads, height, width, dim = query.shape
    keys, bias_rows, bias_cols = _neighbour_index(height, width, kernel_size, dilation, query.device)
    gathered = key.flatten(2, 3)[:, :, keys]  # (B, heads, H, W, k, k, d)
    logits = torch.einsum('bhyxd,bhyxijd->bhyxij', query, gathered)
    if rpb is not None:
        logits = logits + rpb[:, bias_rows, bias_cols][None]  # (heads, H, W, k, k)
    return logits.flatten(4)


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """natten 0.14 ``natten2dav``: the ``attn``-weighted sum of each query's ``k x k`` neighbouring values."""
    batch, heads, height, width, dim = value.shape
    keys, _, _ = _neighbour_index(height, width, kernel_size, dilation, value.device)
    gathered = value.flatten(2, 3)[:, :, keys]  # (B, heads, H, W, k, k, d)
    weights = attn.reshape(batch, heads, height, width, kernel_size, kernel_size)
    return torch.einsum('bhyxij,bhyxijd->bhyxd', weights, gathered)


def install_natten_standin() -> types.ModuleType:
    """Put a ``natten`` / ``natten.functional`` stand-in (built on deformvit's neighborhood tables) in sys.modules."""
    functional = types.ModuleType('natten.functional')
    functional.__doc__ = 'deformvit stand-in for natten 0.14 functional (benchmarks/compare_official.py)'
    functional.natten2dqkrpb = natten2dqkrpb
    functional.natten2dav = natten2dav
    functional.NATTEN2DQKRPBFunction = type('NATTEN2DQKRPBFunction', (_NattenFunction,),
                                            dict(fn=staticmethod(natten2dqkrpb)))
    functional.NATTEN2DAVFunction = type('NATTEN2DAVFunction', (_NattenFunction,), dict(fn=staticmethod(natten2dav)))
    package = types.ModuleType('natten')
    package.__doc__ = 'deformvit stand-in for natten 0.14 (no compiled kernels)'
    package.__path__ = []
    package.functional = functional
    sys.modules['natten'] = package
    sys.modules['natten.functional'] = functional
    return functional


def check_natten_standin(functional) -> float:
    """softmax(natten2dqkrpb) then natten2dav against deformvit's natten-semantics oracle; returns the max error."""
    from deformvit.layers.neighborhood import neighborhood_attention_reference

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for (height, width), kernel_size, dilation in (((7, 7), 7, 1), ((9, 12), 3, 1), ((11, 8), 5, 1),
                                                   ((10, 13), 3, 2), ((14, 15), 7, 2)):
        q, k, v = (torch.randn(2, 3, height, width, 4, generator=gen, dtype=torch.float64) for _ in range(3))
        rpb = torch.randn(3, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=torch.float64)
        attn = functional.NATTEN2DQKRPBFunction.apply(q, k, rpb, kernel_size, dilation).softmax(-1)
        out = functional.NATTEN2DAVFunction.apply(attn, v, kernel_size, dilation)
        expected = neighborhood_attention_reference(q, k, v, rpb, kernel_size, dilation)
        worst = max(worst, (out - expected).abs().max().item())
    if worst > 1e-10:
        raise RuntimeError(f'the natten stand-in disagrees with neighborhood_attention_reference by {worst:.2e}')
    return worst


def import_official_datpp(repo: str):
    """Import the main branch's ``models/dat.py`` (DAT++) as a package, with natten replaced by the stand-in."""
    models = os.path.join(repo, 'models')
    missing = [f for f in ('dat.py', 'nat.py', 'dat_blocks.py') if not os.path.isfile(os.path.join(models, f))]
    if missing:
        raise SystemExit(f'--official-repo {repo}: models/{", models/".join(missing)} not found; for --release datpp '
                         'point it at a checkout of LeapLabTHU/DAT main (dat.py, nat.py at b580702, dat_blocks.py '
                         'at 2f31405)')
    try:
        importlib.import_module('einops')
    except ImportError:
        raise SystemExit('the official DAT++ code (models/dat_blocks.py) imports einops, which is not installed: '
                         'pip install einops, or put a copy on PYTHONPATH') from None
    functional = install_natten_standin()
    err = check_natten_standin(functional)
    print(f'natten replaced by an in-memory stand-in on deformvit.layers.neighborhood '
          f'(max error vs neighborhood_attention_reference {err:.1e})')
    package = types.ModuleType('datpp_release')
    package.__path__ = [models]
    sys.modules['datpp_release'] = package
    # block kinds that no released DAT++ model uses ('E', 'Q'); dat.py imports their modules by name
    for name, attr in (('slide', 'SlideAttention'), ('qna', 'FusedKQnA')):
        if not os.path.isfile(os.path.join(models, f'{name}.py')):
            placeholder = types.ModuleType(f'datpp_release.{name}')
            setattr(placeholder, attr, None)
            sys.modules[f'datpp_release.{name}'] = placeholder
            print(f'note: {models}/{name}.py not found, {attr} replaced by a placeholder (unused by DAT++ models)')
    return importlib.import_module('datpp_release.dat')


def datpp_config(configs: dict, name: str, **overrides) -> dict:
    """The official constructor's keyword arguments: the yaml block without ``_training``, no drop path."""
    config = {k: v for k, v in configs[name].items() if not k.startswith('_')}
    return dict(config, **overrides, drop_path_rate=0.0)


@torch.no_grad()
def randomise_datpp(model: torch.nn.Module, seed: int) -> None:
    """As :func:`randomise`, plus the neighborhood-attention biases; offsets kept mostly inside the map.

    The release's ``reset_parameters`` is a no-op, so the other weights keep PyTorch's default
    initialisation (seeded by the caller). DAT++ clamps unscaled offsets to ``[-1, 1]``, so the
    last offset convolution is scaled by ``1 / sqrt(fan_in)``: large offsets would put every
    point on the border.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if 'rpe_table' in name or name.endswith('.rpb'):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif 'conv_offset.3' in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[1] ** 0.5)
        elif 'norm' in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith('weight')
                    else 0.1 * torch.randn(p.shape, generator=gen))


def build_official_datpp(module, config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = module.DAT(**config).eval()
    randomise_datpp(model, seed)
    return model


def official_datpp_points(model: torch.nn.Module, x: torch.Tensor):
    """Logits and the sampling points of every deformable block (the stages drop them; hooks catch them)."""
    points = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: points.append(out[1]))
             for m in model.modules() if type(m).__name__ == 'DAttentionBaseline']
    try:
        logits = model(x)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return logits, points


def compare_datpp(module, configs: dict, name: str, batch: int, seed: int) -> list:
    import timm
    importlib.import_module('deformvit')  # registers the models with timm

    official = build_official_datpp(module, datpp_config(configs, name), seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{name}.pth')
        torch.save({'model': official.state_dict()}, path)
        ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    ours.eval()
    size = tuple(ours.pretrained_cfg['input_size'][1:])
    rows = []
    for i, (height, width) in enumerate((size, DATPP_EXTRA_SIZE)):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed + 1 + i))
        with torch.no_grad():
            ref_logits, t_official = timed(lambda t: official(t)[0], x)
            logits, t_ours = timed(ours, x)
            _, ref_points = official_datpp_points(official, x)
            _, records = ours.forward_sampling_points(x)
        rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        point_err = max((r.points.reshape(p.shape) - p).abs().max().item() for r, p in zip(records, ref_points))
        border = torch.cat([(p.abs() >= 1).flatten() for p in ref_points]).float().mean().item()
        rows.append(dict(model=name, size=f'{height}x{width}', rel_logit_err=rel, point_err=point_err,
                         n_deformable=len(records), n_official=len(ref_points), border=border,
                         official_s=t_official, ours_s=t_ours))
    return rows


def write_fixture_datpp(module, configs: dict, folder: str, seed: int = 0) -> None:
    config = datpp_config(configs, DATPP_FIXTURE_BASE, **DATPP_FIXTURE_OVERRIDES)
    official = build_official_datpp(module, config, seed)
    inputs = []
    for input_seed, shape in DATPP_FIXTURE_INPUTS:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(input_seed))
        with torch.no_grad():
            logits = official(x)[0]
        inputs.append(dict(seed=input_seed, shape=shape, logits=logits.tolist()))
    os.makedirs(folder, exist_ok=True)
    torch.save({'model': official.state_dict()}, os.path.join(folder, 'datpp_official_mini.pth'))
    with open(os.path.join(folder, 'datpp_official_mini.json'), 'w') as f:
        json.dump(dict(official_overrides=DATPP_FIXTURE_OVERRIDES, deformvit_kwargs=DATPP_FIXTURE_OURS,
                       inputs=inputs), f)
    print(f'wrote {folder}/datpp_official_mini.pth and .json ({sum(p.numel() for p in official.parameters())} params)')


def main_datpp(args) -> None:
    module = import_official_datpp(args.official_repo)
    with open(args.configs or DATPP_CONFIGS) as f:
        configs = yaml.safe_load(f)
    if args.write_fixture:
        write_fixture_datpp(module, configs, args.write_fixture, args.seed)
    print(f"{'model':<16}{'input':>9}{'max rel. logit err':>20}{'max point err':>15}{'on border':>11}"
          f"{'official s':>12}{'ours s':>9}{'speed-up':>10}")
    for name in args.models or DATPP_MODELS:
        for r in compare_datpp(module, configs, name, args.batch, args.seed):
            if r['n_deformable'] != r['n_official']:
                print(f"  {name}: {r['n_deformable']} deformable blocks here, {r['n_official']} in the release")
            print(f"{r['model']:<16}{r['size']:>9}{r['rel_logit_err']:>20.2e}{r['point_err']:>15.2e}"
                  f"{r['border']:>10.1%} {r['official_s']:>12.3f}{r['ours_s']:>9.3f}"
                  f"{r['official_s'] / r['ours_s']:>9.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--release', choices=('v1', 'datpp'), default='v1',
                        help='v1: CVPR 2022 DAT; datpp: DAT++ (main branch, natten replaced by a stand-in)')
    parser.add_argument('--official-repo', required=True,
                        help='checkout of the official DAT code (holds models/dat.py)')
    parser.add_argument('--configs', help='dat_official_v1_configs.yaml (v1) or datpp_official_configs.yaml (datpp)')
    parser.add_argument('--models', nargs='+', help='default: the four released models of --release')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--write-fixture', metavar='FOLDER', help='also write the test fixture into FOLDER')
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    if args.release == 'datpp':
        main_datpp(args)
        return
    module = import_official(args.official_repo)
    if args.write_fixture:
        write_fixture(module, args.write_fixture, args.seed)
    with open(args.configs or DEFAULT_CONFIGS) as f:
        configs = yaml.safe_load(f)
    print(f"{'model':<14}{'input':>7}{'max rel. logit err':>20}{'max point err':>15}{'official s':>12}{'ours s':>9}"
          f"{'speed-up':>10}")
    for name in args.models or ['dat_tiny', 'dat_small', 'dat_base', 'dat_base_384']:
        r = compare(module, name, configs[name], args.batch, args.seed)
        print(f"{r['model']:<14}{r['size']:>7}{r['rel_logit_err']:>20.2e}{r['point_err']:>15.2e}"
              f"{r['official_s']:>12.3f}{r['ours_s']:>9.3f}{r['official_s'] / r['ours_s']:>9.2f}x")


if __name__ == '__main__':
    main()
