"""What the figures show, computed: recorded attention, key importance (DAT Fig. 5), the keys of
one query (DAT Fig. 7), stage heat maps (EAPT Fig. 5-6) and edge differences between windows
(EAPT Fig. 6). docs/visualize.md gives the exact computation behind each."""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers import SamplingPoints, attention_switches
from ...models import DAT, EAPT, DATPlusPlus
from ...models.dat import WindowAttention

__all__ = [
    'EDGE_SAMPLES', 'AttentionRecord', 'EdgeDifferences', 'KeyImportance', 'QueryKeys', 'edge_differences',
    'feature_heatmaps', 'key_importance', 'query_keys', 'record_deformable_attention', 'stage_windows',
    'upsample_to_image',
]

EDGE_SAMPLES = 10  # "each edge gets ten values based on Bilinear Interpolation" (EAPT Sec. IV-C)


class AttentionRecord(NamedTuple):
    """What one deformable attention block computed on an input (DAT Sec. 3.2, Eq. (6)-(9)).

    ``sampling`` holds the block's deformed points (``(B, G, Hk, Wk, 2)`` over its
    ``feature_size`` input map, see :class:`deformvit.SamplingPoints`); ``attention`` the
    softmax weights of Eq. (9), ``(B, heads, H*W, Hk*Wk)``: every query token of the input map
    over the ``Ns = Hk*Wk`` deformed keys. Key ``n`` is projected by ``W_k`` from the features
    sampled at point ``n`` of every offset group (the ``G`` groups' samples are concatenated
    along channels), so each key has ``G`` sampling points.
    """
    sampling: SamplingPoints
    attention: torch.Tensor


@torch.no_grad()
def record_deformable_attention(model: DAT, x: torch.Tensor) -> Tuple[torch.Tensor, List[AttentionRecord]]:
    """Run ``model`` on ``x`` and return its logits and one :class:`AttentionRecord` per deformable
    block, in network order (reusing :meth:`DAT.forward_sampling_points`)."""
    if not isinstance(model, (DAT, DATPlusPlus)):
        raise ValueError(f'{type(model).__name__} is not a DAT or DAT++ model; the attention figures (DAT Figs. 5, 7) '
                         'need one')
    blocks = model.deformable_blocks()
    if not blocks:
        raise ValueError('this DAT has no deformable attention blocks (no "D" in its stage_spec)')
    with attention_switches(model, record_attention=True):
        logits, points = model.forward_sampling_points(x)
        records = [AttentionRecord(p, attn.last_attention) for p, (_, _, attn) in zip(points, blocks)]
    return logits, records


def _bilinear_taps(points: torch.Tensor, size: Tuple[int, int], align_corners: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The four tokens bilinear sampling (DAT Eq. (8)) reads for each point, and their weights.

    Args:
        points: ``(..., 2)`` ``(y, x)`` in ``[-1, 1]`` over an ``H x W`` map.
        size: ``(H, W)``.
        align_corners: the sampling's grid convention.

    Returns:
        ``(index, weight)``, both ``(..., 4)``: flat token indices ``i * W + j`` and weights
        renormalised over the corners inside the map (all zero for a point entirely outside).
    """
    h, w = size
    y, x = points.float().unbind(-1)
    if align_corners:
        fy, fx = (y + 1) / 2 * (h - 1), (x + 1) / 2 * (w - 1)
    else:
        fy, fx = ((y + 1) * h - 1) / 2, ((x + 1) * w - 1) / 2
    y0, x0 = fy.floor(), fx.floor()
    ty, tx = fy - y0, fx - x0
    rows = torch.stack((y0, y0, y0 + 1, y0 + 1), -1)
    cols = torch.stack((x0, x0 + 1, x0, x0 + 1), -1)
    weight = torch.stack(((1 - ty) * (1 - tx), (1 - ty) * tx, ty * (1 - tx), ty * tx), -1)
    inside = (rows >= 0) & (rows <= h - 1) & (cols >= 0) & (cols <= w - 1)
    weight = weight * inside
    total = weight.sum(-1, keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp_min(1e-12), torch.zeros_like(weight))
    index = rows.clamp(0, h - 1).long() * w + cols.clamp(0, w - 1).long()
    return index, weight


def _keys_to_tokens(key_scores: torch.Tensor, sampling: SamplingPoints) -> torch.Tensor:
    """Route ``(B, Ns)`` key scores to the ``(B, H*W)`` tokens of the block's input map.

    A key's score is split equally over its ``G`` sampling points (one per offset group, each
    supplying ``C/G`` of the key's input channels) and each point's share over the up to four
    tokens it interpolates, in proportion to the bilinear weights.
    """
    b, g = sampling.points.shape[:2]
    h, w = sampling.feature_size
    index, weight = _bilinear_taps(sampling.points.reshape(b, -1, 2), (h, w), sampling.align_corners)  # (B, G*Ns, 4)
    point_scores = (key_scores[:, None, :] / g).expand(b, g, -1).reshape(b, -1)  # (B, G*Ns)
    shares = (weight * point_scores[..., None]).flatten(1)
    return key_scores.new_zeros(b, h * w).scatter_add_(1, index.flatten(1), shares)


def _to_earlier_stage(tokens: torch.Tensor, size: Tuple[int, int], earlier: Tuple[int, int], factor: int) -> torch.Tensor:
    """Spread ``(B, H*W)`` token scores over the ``factor x factor`` tokens of an earlier stage
    each token summarises (the 2x2 downsampling of DAT Sec. 3.3, once per stage), equally among
    those inside the earlier ``earlier`` map."""
    (h, w), (he, we) = size, earlier
    if math.ceil(he / factor) != h or math.ceil(we / factor) != w:
        raise ValueError(f'a {h}x{w} map is not the {factor}x downsampling of a {he}x{we} map')
    if factor == 1:
        return tokens
    inside = torch.zeros(h * factor, w * factor, device=tokens.device)
    inside[:he, :we] = 1
    counts = inside.view(h, factor, w, factor).sum((1, 3))  # (H, W) children inside the earlier map
    share = tokens.view(-1, h, w) / counts
    spread = share.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, :he, :we]
    return spread.reshape(tokens.shape[0], he * we)


class KeyImportance(NamedTuple):
    """Propagated attention scores of the deformed keys of one deformable block (DAT Fig. 5).

    ``scores`` is ``(B, Ns)``, one score per key, non-negative and summing to at most 1 (exactly 1
    unless points fell entirely outside a map); ``points`` is ``(B, G, Ns, 2)``, the ``(y, x)``
    input-pixel positions of each key's sampling points.
    """
    stage: int
    block: int
    scores: torch.Tensor
    points: torch.Tensor


def key_importance(records: Sequence[AttentionRecord], layer: int = 0, head: Optional[int] = None) -> KeyImportance:
    """The most important keys of DAT Fig. 5 / Sec. 4.5.

    "From the last deformable attention layer, we cumulatively multiply the attention weights of
    each deformed key to previous layers, then average them among all queries." Here:

    1. Last deformable layer ``L``: each key's attention averaged over all queries (and over heads,
       or of one ``head``).
    2. A key of layer ``l`` is a bilinear sample of layer ``l``'s input map: its score goes to its
       ``G`` sampling points equally and from each point to the tokens it interpolates, by the
       bilinear weights (:func:`_keys_to_tokens`).
    3. The input tokens of layer ``l`` are the query tokens of layer ``l - 1``: the same token in
       the same stage (the blocks in between are skipped, as in the paper), or, across ``k``
       stage changes, the ``2^k x 2^k`` tokens the downsampling merged, equally.
    4. Layer ``l - 1``'s keys get ``sum_q score(q) * mean_heads A(q, key)``; repeat down to ``layer``.

    Args:
        records: :func:`record_deformable_attention` output, in network order.
        layer: index into ``records`` of the block whose keys are scored (default the first).
        head: head of the last layer to start from; None averages its heads.

    Returns:
        :class:`KeyImportance` of ``records[layer]``.
    """
    if not records:
        raise ValueError('no deformable attention records to propagate')
    count = len(records)
    if not -count <= layer < count:
        raise ValueError(f'layer {layer} is out of range for {count} deformable blocks')
    layer %= count
    last = records[-1].attention.float()  # (B, heads, HW, Ns)
    if head is None:
        scores = last.mean(dim=(1, 2))
    elif 0 <= head < last.shape[1]:
        scores = last[:, head].mean(dim=1)
    else:
        raise ValueError(f'head {head} is out of range: the last deformable block has {last.shape[1]} heads')
    for i in range(count - 1, layer, -1):
        upper, lower = records[i], records[i - 1]
        tokens = _keys_to_tokens(scores, upper.sampling)
        factor = upper.sampling.stride // lower.sampling.stride
        queries = _to_earlier_stage(tokens, upper.sampling.feature_size, lower.sampling.feature_size, factor)
        scores = torch.einsum('bq,bmqn->bn', queries, lower.attention.float()) / lower.attention.shape[1]
    target = records[layer].sampling
    b, g = target.points.shape[:2]
    return KeyImportance(target.stage, target.block, scores, target.to_pixels('points').reshape(b, g, -1, 2))


class QueryKeys(NamedTuple):
    """The attention of one query over the deformed keys of a block (DAT Fig. 7).

    ``weights`` is ``(B, Ns)`` (summing to 1 per image); ``points`` the ``(B, G, Ns, 2)``
    input-pixel positions of each key's sampling points; ``query`` the ``(y, x)`` pixel asked for
    and ``token`` the ``(row, col)`` query token of the block's input map that contains it.
    """
    stage: int
    block: int
    query: Tuple[float, float]
    token: Tuple[int, int]
    weights: torch.Tensor
    points: torch.Tensor


def query_keys(record: AttentionRecord, query: Tuple[float, float], image_size: Tuple[int, int],
               head: Optional[int] = None) -> QueryKeys:
    """Attention of the query token under pixel ``query`` over the block's keys (DAT Fig. 7).

    Args:
        record: one block's :class:`AttentionRecord` (Fig. 7 uses the last deformable layer).
        query: ``(y, x)`` input-pixel position.
        image_size: ``(H, W)`` of the input, to check ``query``.
        head: one head's weights; None averages all heads.
    """
    (y, x), (height, width) = query, image_size
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(f'query point (y={y}, x={x}) lies outside the {height}x{width} input')
    sampling = record.sampling
    h, w = sampling.feature_size
    # token i covers input pixels [i * stride, (i + 1) * stride)
    row = min(int((y + 0.5) // sampling.stride), h - 1)
    col = min(int((x + 0.5) // sampling.stride), w - 1)
    attention = record.attention.float()[:, :, row * w + col]  # (B, heads, Ns)
    if head is None:
        weights = attention.mean(1)
    elif 0 <= head < attention.shape[1]:
        weights = attention[:, head]
    else:
        raise ValueError(f'head {head} is out of range: stages.{sampling.stage}.blocks.{sampling.block} has '
                         f'{attention.shape[1]} heads')
    b, g = sampling.points.shape[:2]
    return QueryKeys(sampling.stage, sampling.block, (float(y), float(x)), (row, col), weights,
                     sampling.to_pixels('points').reshape(b, g, -1, 2))


def feature_heatmaps(features: Sequence[torch.Tensor], reduction: str = 'norm') -> List[torch.Tensor]:
    """One heat map per stage (EAPT Fig. 5, Fig. 6 lines 1-2): ``(B, H_s, W_s)`` per stage.

    Args:
        features: ``(B, C, H_s, W_s)`` stage outputs,
            ``model.forward_intermediates(x, intermediates_only=True)``.
        reduction: over channels, ``'norm'`` (L2 norm: the activation magnitude) or ``'mean'``.
    """
    if reduction not in ('norm', 'mean'):
        raise ValueError(f"reduction must be 'norm' or 'mean', got {reduction!r}")
    return [f.float().norm(dim=1) if reduction == 'norm' else f.float().mean(dim=1) for f in features]


def upsample_to_image(maps: torch.Tensor, stride: int, image_size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample ``(B, h, w)`` token maps of stride ``stride`` to ``(B, H, W)`` input pixels.

    Token ``i`` is centred on pixel ``(i + 0.5) * stride - 0.5`` (as in
    :meth:`deformvit.SamplingPoints.to_pixels`); the padded bottom/right is cropped.
    """
    h, w = maps.shape[-2:]
    up = F.interpolate(maps[:, None].float(), size=(h * stride, w * stride), mode='bilinear', align_corners=False)
    return up[:, 0, :image_size[0], :image_size[1]]


def stage_windows(model: nn.Module, sizes: Sequence[Tuple[int, int]]) -> List[Optional[Tuple[int, int]]]:
    """The attention window of each stage at the given stage map sizes, None where a stage has none.

    EAPT: the window its blocks partition the stage's map into (a map smaller than the window is
    one window). DAT: the window of its local-attention blocks (the Swin-style baseline of EAPT
    Fig. 6).
    """
    windows = []
    for stage, size in zip(model.stages, sizes):
        window = None
        for block in stage.blocks:
            if isinstance(model, EAPT):
                window = block.attn.effective_window(tuple(size))
            elif isinstance(block.attn, WindowAttention):
                window = tuple(min(wd, s) for wd, s in zip(block.attn.window_size, size))
            if window is not None:
                break
        windows.append(window)
    return windows


class EdgeDifferences(NamedTuple):
    """Edge difference between adjacent windows (EAPT Fig. 6 lines 3-6).

    ``per_window`` is ``(B, rows, cols)``: the mean over a window's edges shared with a
    neighbour (four inside, three or two at the border). ``horizontal`` ``(B, rows, cols - 1)``
    holds the difference across the boundary between windows ``(r, c)`` and ``(r, c + 1)``,
    ``vertical`` ``(B, rows - 1, cols)`` between ``(r, c)`` and ``(r + 1, c)``. ``scale``
    ``(B,)`` is the mean absolute feature value, to read the differences relative to it.
    """
    window: Tuple[int, int]
    per_window: torch.Tensor
    horizontal: torch.Tensor
    vertical: torch.Tensor
    scale: torch.Tensor


def _boundary_differences(features: torch.Tensor, window: Tuple[int, int], samples: int) -> torch.Tensor:
    """``(B, rows, cols - 1)``: mean |left - right| across each vertical window boundary.

    The left window's last column and the right window's first column are each read at
    ``samples`` points spread evenly over the window's rows, by linear interpolation between rows
    (bilinear interpolation on an integer column).
    """
    _, _, h, w = features.shape
    wh, ww = window
    rows = math.ceil(h / wh)
    starts = torch.arange(rows, dtype=torch.float32) * wh
    ends = torch.clamp(starts + wh, max=h) - 1
    steps = torch.linspace(0, 1, samples)
    ys = starts[:, None] + (ends - starts)[:, None] * steps  # (rows, S) positions along each edge
    y0 = ys.floor().long()
    y1 = (y0 + 1).clamp(max=h - 1)
    t = (ys - y0).to(features.dtype)
    boundaries = torch.arange(ww, w, ww)  # first column of every window but the first
    left = features[..., boundaries - 1]  # (B, C, H, cols - 1): last column of the left windows
    right = features[..., boundaries]  # first column of the right windows
    t = t[..., None]  # (rows, S, 1)
    left_at = left[:, :, y0] * (1 - t) + left[:, :, y1] * t  # (B, C, rows, S, cols - 1)
    right_at = right[:, :, y0] * (1 - t) + right[:, :, y1] * t
    return (left_at - right_at).abs().mean(dim=(1, 3))  # (B, rows, cols - 1)


def edge_differences(features: torch.Tensor, window: Tuple[int, int], samples: int = EDGE_SAMPLES) -> EdgeDifferences:
    """Difference between the edge features of adjacent windows (EAPT Sec. IV-C, Fig. 6 lines 3-6).

    "We directly calculate the difference between the edge feature values of adjacent patches
    (each edge gets ten values based on Bilinear Interpolation) and finally report the average of
    the four edges (two edges for peripheral patches) of each patch." The windows tile the map
    from the top-left (the last row/column of windows may be partial). For each pair of adjacent
    windows, each window's edge row/column on their common boundary is read at ``samples``
    evenly spaced points along the edge; the pair's difference is the mean over points and
    channels of the absolute difference. A window's value is the mean over its edges that have a
    neighbour.

    Args:
        features: ``(B, C, H, W)`` map (a stage output).
        window: ``(Wh, Ww)`` window the stage partitions its map into.
        samples: values per edge (ten in the paper).
    """
    if features.ndim != 4:
        raise ValueError(f'expected a (B, C, H, W) feature map, got shape {tuple(features.shape)}')
    if samples < 1:
        raise ValueError(f'samples must be >= 1, got {samples}')
    _, _, h, w = features.shape
    wh, ww = window
    rows, cols = math.ceil(h / wh), math.ceil(w / ww)
    if rows * cols < 2:
        raise ValueError(f'a {h}x{w} map in {wh}x{ww} windows is a single window: there are no edges between windows')
    features = features.float()
    horizontal = _boundary_differences(features, (wh, ww), samples)  # (B, rows, cols - 1)
    vertical = _boundary_differences(features.transpose(-1, -2), (ww, wh), samples).transpose(-1, -2)  # (B, rows - 1, cols)
    total = features.new_zeros(features.shape[0], rows, cols)
    count = features.new_zeros(rows, cols)
    total[:, :, :-1] += horizontal
    total[:, :, 1:] += horizontal
    count[:, :-1] += 1
    count[:, 1:] += 1
    total[:, :-1] += vertical
    total[:, 1:] += vertical
    count[:-1] += 1
    count[1:] += 1
    return EdgeDifferences((wh, ww), total / count, horizontal, vertical, features.abs().mean(dim=(1, 2, 3)))
