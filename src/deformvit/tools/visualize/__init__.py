"""deformvit visualize: the DAT and EAPT papers' figures on any image and any checkpoint.

Figures (--figure; default: every figure that applies to the model):
  sampling-points  DAT Fig. 6: the deformed sampling points (orange) and their reference
                   points (yellow) of one offset group of a deformable block, by default the
                   last deformable block of each deformable stage. On EAPT: the deformed,
                   clamped key positions C(l + o) of a block (EAPT Eq. (1)-(2)).
  key-importance   DAT Fig. 5 (DAT only): the deformed keys with the most attention, propagated
                   from the last deformable layer down to the first deformable layer and
                   averaged over all queries; circles sized by score.
  query-keys       DAT Fig. 7 (DAT only): for one query point (red star), the keys with the
                   highest attention in the last deformable layer.
  eapt-heatmaps    EAPT Fig. 5 and Fig. 6 lines 1-2: a heat map of each stage's features.
  eapt-edges       EAPT Fig. 6 lines 3-6: per window, the mean difference between its edge
                   features and its neighbours' (ten bilinear samples per edge).

The image is --image PATH (any size; grayscale, palette and RGBA images are converted to RGB)
or, by default, a photo shipped with scikit-image (--sample). It is preprocessed with timm's
eval transform of the model (resize, center crop, normalise) and the figures show that crop,
so every point lands where the network sampled. --checkpoint takes an official DAT release
file, a converted .safetensors or a deformvit classification training checkpoint; without it
the weights are random (--seed) and every title says so. Stages and blocks are 0-based, as in
the module names stages.S.blocks.B (the paper's "Stage 3" is --stage 2). docs/visualize.md
gives the exact computation behind each figure.

Examples:
  deformvit visualize                                   # dat_tiny, random weights, the cat photo
  deformvit visualize --model dat_tiny --checkpoint dat_tiny_in1k.pth --image street.jpg
  deformvit visualize --figure query-keys --query 80 150 --checkpoint runs/best.safetensors
  deformvit visualize --model eapt_small --figure eapt-heatmaps eapt-edges -o figures
"""
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image

from ...layers import SamplingPoints
from ...models import DAT, EAPT, DATPlusPlus
from .analysis import (
    EDGE_SAMPLES,
    AttentionRecord,
    EdgeDifferences,
    KeyImportance,
    QueryKeys,
    edge_differences,
    feature_heatmaps,
    key_importance,
    query_keys,
    record_deformable_attention,
    stage_windows,
    upsample_to_image,
)
from .drawing import (
    DPI,
    PANEL_INCHES,
    TITLE_INCHES,
    draw_edge_differences,
    draw_heatmaps,
    draw_key_importance,
    draw_query_keys,
    draw_sampling_points,
)
from .images import SAMPLE_PHOTOS, load_image, preprocess

__all__ = [
    'DPI', 'EDGE_SAMPLES', 'FIGURES', 'PANEL_INCHES', 'SAMPLE_PHOTOS', 'TITLE_INCHES', 'AttentionRecord',
    'EdgeDifferences', 'KeyImportance', 'QueryKeys', 'draw_edge_differences', 'draw_figures', 'draw_heatmaps',
    'draw_key_importance', 'draw_query_keys', 'draw_sampling_points', 'edge_differences', 'feature_heatmaps',
    'key_importance', 'load_image', 'preprocess', 'query_keys', 'record_deformable_attention', 'stage_windows',
    'upsample_to_image',
]

# figure -> model families it applies to
FIGURES: Dict[str, Tuple[str, ...]] = {
    'sampling-points': ('dat', 'eapt'),
    'key-importance': ('dat',),
    'query-keys': ('dat',),
    'eapt-heatmaps': ('dat', 'eapt'),
    'eapt-edges': ('dat', 'eapt'),
}


def _family(model: nn.Module) -> str:
    if isinstance(model, (DAT, DATPlusPlus)):  # DAT++'s deformable attention records what DAT's does
        return 'dat'
    if isinstance(model, EAPT):
        return 'eapt'
    raise ValueError(f'{type(model).__name__} is not a DAT, DAT++ or EAPT model; visualize draws those families')


def _figures(requested: Sequence[str], family: str, has_deformable: bool) -> List[str]:
    applicable = [f for f, families in FIGURES.items() if family in families
                  and (has_deformable or f not in ('sampling-points', 'key-importance', 'query-keys'))]
    if 'all' in requested:
        return applicable
    for figure in requested:
        if family not in FIGURES[figure]:
            raise ValueError(f'{figure} is a DAT figure and does not apply to an EAPT model; figures for EAPT: '
                             f'{", ".join(applicable)}')
        if figure not in applicable:
            raise ValueError(f'{figure} needs deformable attention blocks, which this model has none of')
    return list(dict.fromkeys(requested))


def _select(records: Sequence[SamplingPoints], stage: Optional[int], block: Optional[int],
            default: str) -> List[int]:
    """Indices of the records chosen by ``--stage`` / ``--block``.

    ``default``: ``'per-stage'`` (the last block of each of the last two stages that have one, as
    DAT Fig. 6 shows stages 3 and 4), ``'first'`` or ``'last'``.
    """
    names = ', '.join(f'stages.{r.stage}.blocks.{r.block}' for r in records)
    if block is not None and stage is None:
        raise ValueError('--block needs --stage (blocks are numbered within a stage)')
    if stage is None:
        if default == 'first':
            return [0]
        if default == 'last':
            return [len(records) - 1]
        last = {r.stage: i for i, r in enumerate(records)}
        return sorted(last.values())[-2:]
    chosen = [i for i, r in enumerate(records) if r.stage == stage and (block is None or r.block == block)]
    if not chosen:
        where = f'stages.{stage}' + (f'.blocks.{block}' if block is not None else '')
        raise ValueError(f'{where} has no deformable block; deformable blocks: {names}')
    return chosen[-1:]


@torch.no_grad()
def draw_figures(
        model: nn.Module,
        name: str,
        weights: str,
        image: Image.Image,
        source: str,
        output: str,
        figures: Sequence[str] = ('all',),
        size: Optional[int] = None,
        stage: Optional[int] = None,
        block: Optional[int] = None,
        group: Optional[int] = None,
        head: Optional[int] = None,
        query: Optional[Tuple[float, float]] = None,
        top_k: int = 32,
        reduction: str = 'norm',
        edge_samples: int = EDGE_SAMPLES,
        device: str = 'cpu',
) -> List[str]:
    """Draw the papers' figures of a DAT or EAPT ``model`` on ``image`` into ``output``.

    Args:
        model: the model, ``name`` its architecture and ``weights`` its weights in words (for titles).
        image: an RGB image, ``source`` where it came from (for titles).
        output: folder of the PNG files ``<name>-<figure>.png`` (created if missing).
        figures: names of :data:`FIGURES`, or ``'all'`` (every figure that applies to the model).
        size: input side (default: the model's input size).
        stage, block: 0-based stage (and block within it) to draw; see ``deformvit visualize --help``.
        group: offset group (default: 0 for sampling-points, all groups for the attention figures).
        head: attention head (default: the mean over heads).
        query: ``(x, y)`` pixel of the displayed input for query-keys (default: the centre).
        top_k: keys drawn by key-importance and query-keys.
        reduction: channel reduction of eapt-heatmaps, ``'norm'`` or ``'mean'``.
        edge_samples: values per window edge in eapt-edges.
        device: where the model runs.

    Returns:
        The written PNG paths.
    """
    family = _family(model)
    figures = _figures(figures, family, bool(model.deformable_blocks()))
    x, display = preprocess(image, model, size)
    title = f'{name}, {weights}\n{source}, input {x.shape[-2]}x{x.shape[-1]}'
    device = torch.device(device)
    model, x = model.to(device), x.to(device)
    os.makedirs(output, exist_ok=True)
    strides = [info['reduction'] for info in model.feature_info]
    written = []

    def save(fig, figure: str) -> None:
        path = os.path.join(output, f'{name}-{figure}.png')
        fig.savefig(path, dpi=DPI)
        written.append(path)

    records = []
    if family == 'dat' and any(f in figures for f in ('sampling-points', 'key-importance', 'query-keys')):
        _, records = record_deformable_attention(model, x)
        records = [AttentionRecord(r.sampling._replace(points=r.sampling.points.cpu(),
                                                       reference=r.sampling.reference.cpu()),
                                   r.attention.cpu()) for r in records]
    if 'sampling-points' in figures:
        if family == 'dat':
            points = [r.sampling for r in records]
        else:
            points = [p._replace(points=p.points.cpu(), reference=p.reference.cpu())
                      for p in model.forward_sampling_points(x)[1]]
        chosen = _select(points, stage, block, 'per-stage')
        label = 'DAT Fig. 6 style: deformed sampling points' if family == 'dat' else \
            'deformed key positions C(l + o) of EAPT Eq. (1)-(2), drawn as DAT Fig. 6'
        save(draw_sampling_points(display, [points[i] for i in chosen], group or 0, f'{label}\n{title}'),
             'sampling-points')
    if 'key-importance' in figures:
        layer = _select([r.sampling for r in records], stage, block, 'first')[0]
        importance = key_importance(records, layer, head)
        save(draw_key_importance(display, importance, top_k, group, f'DAT Fig. 5 style: most important keys\n{title}'),
             'key-importance')
    if 'query-keys' in figures:
        layer = _select([r.sampling for r in records], stage, block, 'last')[0]
        input_size = tuple(x.shape[-2:])
        point = (query[1], query[0]) if query else ((input_size[0] - 1) / 2, (input_size[1] - 1) / 2)
        result = query_keys(records[layer], point, input_size, head)
        save(draw_query_keys(display, result, top_k, group, f'DAT Fig. 7 style: keys of one query\n{title}'), 'query-keys')
    if 'eapt-heatmaps' in figures or 'eapt-edges' in figures:
        features = model.forward_intermediates(x, intermediates_only=True)
        num_stages = len(features)
        if stage is not None and not 0 <= stage < num_stages:
            raise ValueError(f'--stage {stage} is out of range: the model has stages 0-{num_stages - 1}')
        stages = [stage] if stage is not None else list(range(num_stages))
        if 'eapt-heatmaps' in figures:
            heatmaps = feature_heatmaps(features, reduction)
            save(draw_heatmaps(display, [h.cpu() for h in heatmaps], strides, stages,
                               f'EAPT Fig. 6 style: feature heat maps (channel {reduction})\n{title}'), 'eapt-heatmaps')
        if 'eapt-edges' in figures:
            windows = stage_windows(model, [f.shape[-2:] for f in features])
            usable = [s for s in stages if windows[s] is not None
                      and math.ceil(features[s].shape[-2] / windows[s][0]) * math.ceil(features[s].shape[-1] / windows[s][1]) > 1]
            if stage is not None and not usable:
                h, w = features[stage].shape[-2:]
                raise ValueError(f'stage {stage} ({h}x{w}) is a single window or has no windows: '
                                 'no edges between windows to compare')
            if usable:
                results = [edge_differences(features[s].detach().cpu(), windows[s], edge_samples) for s in usable]
                save(draw_edge_differences(display, results, strides, usable,
                                           f'EAPT Fig. 6 style: edge differences between adjacent windows\n{title}'), 'eapt-edges')
    return written
