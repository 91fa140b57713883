"""The figures, drawn with matplotlib (no display needed): one panel per block or stage over the
model's input crop, titled with the model and its weights."""
from typing import Optional, Sequence

import numpy as np
import torch

from ...errors import optional
from ...layers import SamplingPoints
from .analysis import EdgeDifferences, KeyImportance, QueryKeys, upsample_to_image

__all__ = ['DPI', 'PANEL_INCHES', 'TITLE_INCHES', 'draw_edge_differences', 'draw_heatmaps', 'draw_key_importance',
           'draw_query_keys', 'draw_sampling_points']

PANEL_INCHES = 4.0
TITLE_INCHES = 0.8
DPI = 100
DEFORMED_COLOR = '#ff8c00'
REFERENCE_COLOR = '#ffe135'


def _figure(panels: int, title: str, extra_width: float = 0.):
    Figure = optional('matplotlib.figure', 'The figures', package='matplotlib', extra='demo').Figure
    fig = Figure(figsize=(PANEL_INCHES * panels + extra_width, PANEL_INCHES + TITLE_INCHES), dpi=DPI,
                 layout='constrained')
    axes = fig.subplots(1, panels, squeeze=False)[0]
    fig.suptitle(title, fontsize=9)
    return fig, list(axes)


def _show(ax, image: np.ndarray, title: str, points: Sequence[np.ndarray] = ()) -> None:
    """Draw ``image`` with pixel centres at integer coordinates; keep every point in view."""
    ax.imshow(image)
    h, w = image.shape[:2]
    ys = [-0.5, h - 0.5] + [float(v) for p in points if len(p) for v in (p[:, 0].min(), p[:, 0].max())]
    xs = [-0.5, w - 0.5] + [float(v) for p in points if len(p) for v in (p[:, 1].min(), p[:, 1].max())]
    margin = 0.02 * max(h, w)
    ax.set_xlim(min(xs) - margin, max(xs) + margin)
    ax.set_ylim(max(ys) + margin, min(ys) - margin)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_sampling_points(image: np.ndarray, records: Sequence[SamplingPoints], group: int = 0,
                         title: str = '', batch: int = 0):
    """DAT Fig. 6: one panel per record, its group ``group``'s deformed points (orange) and
    reference points (yellow) joined by lines, over ``image`` (the model's input crop).

    Returns a matplotlib ``Figure``.
    """
    collections = optional('matplotlib.collections', 'The figures', package='matplotlib', extra='demo')
    fig, axes = _figure(len(records), title)
    for ax, record in zip(axes, records):
        groups = record.points.shape[1]
        if not 0 <= group < groups:
            raise ValueError(f'group {group} is out of range: stages.{record.stage}.blocks.{record.block} has '
                             f'{groups} offset groups')
        points = record.to_pixels('points')[batch, group].reshape(-1, 2).cpu().numpy()
        reference = record.to_pixels('reference')[batch, group].reshape(-1, 2).cpu().numpy()
        label = f', group {group}' if groups > 1 else ''
        _show(ax, image, f'stages.{record.stage}.blocks.{record.block}{label}: {len(points)} points',
              (points, reference))
        segments = np.stack((reference[:, ::-1], points[:, ::-1]), 1)  # (N, 2, (x, y))
        ax.add_collection(collections.LineCollection(segments, colors='white', linewidths=0.5, alpha=0.7))
        ax.scatter(reference[:, 1], reference[:, 0], s=6, c=REFERENCE_COLOR, label='reference points')
        ax.scatter(points[:, 1], points[:, 0], s=12, c=DEFORMED_COLOR, edgecolors='black', linewidths=0.3,
                   label='deformed points')
    return fig


def _top_points(scores: torch.Tensor, points: torch.Tensor, top_k: int, group: Optional[int]):
    """Points and scores of the ``top_k`` keys (all groups' points, or ``group``'s)."""
    if top_k < 1:
        raise ValueError(f'top-k must be >= 1, got {top_k}')
    groups = points.shape[0]
    if group is not None and not 0 <= group < groups:
        raise ValueError(f'group {group} is out of range: the block has {groups} offset groups')
    order = scores.topk(min(top_k, scores.numel())).indices
    chosen = points[:, order] if group is None else points[group:group + 1, order]  # (G', k, 2)
    return chosen.reshape(-1, 2).cpu().numpy(), scores[order].expand(chosen.shape[0], -1).reshape(-1).cpu().numpy()


def draw_key_importance(image: np.ndarray, importance: KeyImportance, top_k: int = 32, group: Optional[int] = None,
                        title: str = '', batch: int = 0):
    """DAT Fig. 5: the ``top_k`` keys by propagated score as circles whose radius grows with the score."""
    points, scores = _top_points(importance.scores[batch], importance.points[batch], top_k, group)
    fig, (ax,) = _figure(1, title)
    _show(ax, image, f'keys of stages.{importance.stage}.blocks.{importance.block}: top {top_k} by propagated '
                     f'attention', (points,))
    radius = 16 * scores / max(scores.max(), 1e-12)  # points
    ax.scatter(points[:, 1], points[:, 0], s=radius ** 2, facecolors='none', edgecolors=DEFORMED_COLOR,
               linewidths=1.5, label='important keys')
    return fig


def draw_query_keys(image: np.ndarray, result: QueryKeys, top_k: int = 32, group: Optional[int] = None,
                    title: str = '', batch: int = 0):
    """DAT Fig. 7: the query (red star) and its ``top_k`` keys (orange dots sized by attention)."""
    points, weights = _top_points(result.weights[batch], result.points[batch], top_k, group)
    fig, (ax,) = _figure(1, title)
    query = np.array([result.query])
    _show(ax, image, f'stages.{result.stage}.blocks.{result.block}: top {top_k} keys of query token '
                     f'{result.token}', (points, query))
    size = 6 + 60 * weights / max(weights.max(), 1e-12)
    ax.scatter(points[:, 1], points[:, 0], s=size, c=DEFORMED_COLOR, edgecolors='black', linewidths=0.3,
               label='keys')
    ax.scatter([result.query[1]], [result.query[0]], s=220, marker='*', c='red', edgecolors='white',
               linewidths=0.8, label='query')
    return fig


def draw_heatmaps(image: np.ndarray, heatmaps: Sequence[torch.Tensor], strides: Sequence[int],
                  stages: Sequence[int], title: str = '', batch: int = 0):
    """EAPT Fig. 5 / Fig. 6 lines 1-2: the image, then each stage's heat map (min-max scaled) over it."""
    fig, axes = _figure(len(stages) + 1, title)
    _show(axes[0], image, 'input')
    for ax, stage in zip(axes[1:], stages):
        heat = upsample_to_image(heatmaps[stage][batch:batch + 1], strides[stage], image.shape[:2])[0].cpu().numpy()
        heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
        h, w = heatmaps[stage].shape[-2:]
        _show(ax, image, f'stage {stage} ({h}x{w}, stride {strides[stage]})')
        ax.imshow(heat, cmap='jet', alpha=0.5)
    return fig


def draw_edge_differences(image: np.ndarray, results: Sequence[EdgeDifferences], strides: Sequence[int],
                          stages: Sequence[int], title: str = '', batch: int = 0):
    """EAPT Fig. 6 lines 3-6: each window's mean edge difference, drawn over its part of the image."""
    fig, axes = _figure(len(results), title, extra_width=0.6 * len(results))
    for ax, result, stage in zip(axes, results, stages):
        values = result.per_window[batch].cpu().numpy()
        rows, cols = values.shape
        (wh, ww), stride = result.window, strides[stage]
        relative = values.mean() / max(float(result.scale[batch]), 1e-12)
        _show(ax, image, f'stage {stage}: {rows}x{cols} windows of {wh}x{ww}; mean {values.mean():.3g} '
                         f'({100 * relative:.0f}% of mean |f|)')
        extent = (-0.5, cols * ww * stride - 0.5, rows * wh * stride - 0.5, -0.5)
        shown = ax.imshow(values, cmap='magma', alpha=0.6, extent=extent, interpolation='nearest')
        for r in range(1, rows):
            ax.axhline(r * wh * stride - 0.5, color='white', linewidth=0.5)
        for c in range(1, cols):
            ax.axvline(c * ww * stride - 0.5, color='white', linewidth=0.5)
        fig.colorbar(shown, ax=ax, shrink=0.8)
    return fig
