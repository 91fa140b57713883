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
import argparse
import contextlib
import math
import os
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config

from .checkpoint import UnsafeCheckpointError
from .models.dat import DAT, DeformableAttention, SamplingPoints, WindowAttention
from .models.eapt import EAPT, WindowGeometry
from .tasks import load_classifier

__all__ = [
    'AttentionRecord',
    'EdgeDifferences',
    'FIGURES',
    'KeyImportance',
    'QueryKeys',
    'SAMPLE_PHOTOS',
    'add_arguments',
    'attention_recording',
    'draw_edge_differences',
    'draw_heatmaps',
    'draw_key_importance',
    'draw_query_keys',
    'draw_sampling_points',
    'eapt_sampling_points',
    'edge_differences',
    'feature_heatmaps',
    'key_importance',
    'load_image',
    'load_model',
    'main',
    'preprocess',
    'query_keys',
    'record_deformable_attention',
    'stage_windows',
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
SAMPLE_PHOTOS = ('chelsea', 'astronaut', 'coffee', 'rocket')  # RGB photos in skimage.data
EDGE_SAMPLES = 10  # "each edge gets ten values based on Bilinear Interpolation" (EAPT Sec. IV-C)
PANEL_INCHES = 4.0
TITLE_INCHES = 0.8
DPI = 100
DEFORMED_COLOR = '#ff8c00'
REFERENCE_COLOR = '#ffe135'


# ---------------------------------------------------------------------------- inputs and weights

def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any Pillow image: transparency over white, high-bit-depth gray rescaled."""
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba).convert('RGB')
    if image.mode in ('I', 'F') or image.mode.startswith('I;'):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert('RGB')
    return image.convert('RGB')


def load_image(path: Optional[str] = None, sample: str = 'chelsea') -> Image.Image:
    """The image at ``path`` as RGB, or the scikit-image photo ``sample`` when ``path`` is None.

    Grayscale, palette and high-bit-depth images become RGB; transparent pixels are shown over
    white.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not an image Pillow can read, or ``sample`` is unknown.
    """
    if path is None:
        if sample not in SAMPLE_PHOTOS:
            raise ValueError(f'unknown sample photo {sample!r}; expected one of {", ".join(SAMPLE_PHOTOS)}')
        try:
            from skimage import data
        except ImportError as err:
            raise ValueError('the sample photos come from scikit-image: pip install scikit-image, '
                             'or pass --image PATH') from err
        return Image.fromarray(getattr(data, sample)())
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no image file at {path}')
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f'{path} is not a readable image ({err}); expected a file Pillow reads '
                         '(PNG, JPEG, BMP, TIFF, ...)') from err


def _family(model: nn.Module) -> str:
    if isinstance(model, DAT):
        return 'dat'
    if isinstance(model, EAPT):
        return 'eapt'
    raise ValueError(f'{type(model).__name__} is neither a DAT nor an EAPT model; visualize draws those two families')


def load_model(
        name: Optional[str] = None,
        checkpoint: Optional[str] = None,
        seed: int = 0,
        default: str = 'dat_tiny',
) -> Tuple[nn.Module, str, str]:
    """``(model, name, weights)``: a DAT or EAPT model in eval mode and a description of its weights.

    Args:
        name: registered model name (``dat_tiny``, ``eapt_small``, ...); None: the one a training
            checkpoint records, else ``default``.
        checkpoint: an official DAT release file, a converted ``.safetensors`` or a deformvit
            classification training checkpoint (:func:`deformvit.tasks.load_classifier`); None:
            random weights drawn with ``seed``.
        seed: seed of the random weights.
        default: model used when neither ``name`` nor the checkpoint names one.

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: unknown model, a model of another family, a checkpoint of another task or
            architecture, or an unreadable checkpoint.
    """
    if name is not None and not timm.is_model(name):
        raise ValueError(f'unknown model {name!r}; expected a registered DAT or EAPT model such as dat_tiny or eapt_small')
    if checkpoint is None:
        name = name or default
        torch.manual_seed(seed)
        model = timm.create_model(name)
        _family(model)
        return model.eval(), name, f'random weights (seed {seed}), untrained'
    model, name = load_classifier(checkpoint, name, default)
    _family(model)
    return model, name, f'weights {os.path.basename(checkpoint)}'


def preprocess(image: Image.Image, model: nn.Module, size: Optional[int] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """timm's eval transform of ``model`` (resize by ``crop_pct``, center crop, normalise).

    Args:
        image: an RGB image of any size.
        model: the model whose ``pretrained_cfg`` gives interpolation, crop and mean/std.
        size: input side (default: the model's ``input_size``).

    Returns:
        ``(x, display)``: the ``(1, 3, S, S)`` input and the same crop as an ``(S, S, 3)`` float
        array in ``[0, 1]``; input pixel ``(i, j)`` is display pixel ``(i, j)``.
    """
    if model.in_chans != 3:
        raise ValueError(f'the model takes {model.in_chans} input channels; visualize feeds RGB images (3)')
    minimum = getattr(model, 'min_input_size', 1)
    if size is not None and size < minimum:
        raise ValueError(f'input size {size} is smaller than the {minimum}x{minimum} minimum of this model')
    config = resolve_data_config({'input_size': (3, size, size)} if size else {}, model=model)
    x = create_transform(**config)(image).unsqueeze(0)  # (1, 3, S, S)
    mean = torch.tensor(config['mean']).view(3, 1, 1)
    std = torch.tensor(config['std']).view(3, 1, 1)
    display = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (3, S, S) -> (S, S, 3)
    return x, display


# ---------------------------------------------------------------------------- DAT: recorded attention

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


@contextlib.contextmanager
def attention_recording(model: nn.Module) -> Iterator[List[DeformableAttention]]:
    """Make every :class:`DeformableAttention` of ``model`` keep its softmax weights.

    Inside the context the blocks take their explicit softmax path and store the weights in
    ``last_attention``; on exit the flag is off and the weights are dropped, so the model is
    back to its default (fused) path.
    """
    modules = [m for m in model.modules() if isinstance(m, DeformableAttention)]
    for module in modules:
        module.record_attention = True
    try:
        yield modules
    finally:
        for module in modules:
            module.record_attention = False
            module.last_attention = None


@torch.no_grad()
def record_deformable_attention(model: DAT, x: torch.Tensor) -> Tuple[torch.Tensor, List[AttentionRecord]]:
    """Run ``model`` on ``x`` and return its logits and one :class:`AttentionRecord` per deformable
    block, in network order (reusing :meth:`DAT.forward_sampling_points`)."""
    if not isinstance(model, DAT):
        raise ValueError(f'{type(model).__name__} is not a DAT model; the attention figures (DAT Figs. 5, 7) need one')
    blocks = model.deformable_blocks()
    if not blocks:
        raise ValueError('this DAT has no deformable attention blocks (no "D" in its stage_spec)')
    with attention_recording(model):
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


# ---------------------------------------------------------------------------- EAPT and feature maps

@torch.no_grad()
def eapt_sampling_points(model: EAPT, x: torch.Tensor) -> List[SamplingPoints]:
    """The deformed key positions ``C(l + o)`` (EAPT Eq. (1)-(2)) of every EAPT block with offsets.

    Each window position ``l`` reads its key at ``C(l + o)``; the positions are laid back on the
    stage's map, so a record holds ``(B, 1, H, W, 2)`` points and references ``l`` in the
    ``align_corners=True`` normalisation of :class:`deformvit.SamplingPoints` (one group).
    """
    if not isinstance(model, EAPT):
        raise ValueError(f'{type(model).__name__} is not an EAPT model')
    modules = [(i, j, attn) for i, j, attn in model.attention_modules() if attn.offset_net is not None]
    if not modules:
        raise ValueError('this EAPT has no deformable attention (broaden_size 0 in every stage)')
    for _, _, attn in modules:
        attn.record_sampling = True
    try:
        features = model.forward_intermediates(x, intermediates_only=True)
        records = []
        for stage, block, attn in modules:
            h, w = features[stage].shape[-2:]
            geometry = WindowGeometry.of((h, w), attn.effective_window((h, w)))
            positions = attn.last_sampling.flatten(0, 1).view(-1, *geometry.window, 2)  # (B*nW, Wh, Ww, 2)
            positions = geometry.reverse(positions)[:, :h, :w]  # (B, H, W, 2) map positions (y, x)
            scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], dtype=torch.float32, device=positions.device)
            rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=positions.device),
                                        torch.arange(w, dtype=torch.float32, device=positions.device), indexing='ij')
            reference = torch.stack((rows, cols), -1) / scale * 2 - 1
            records.append(SamplingPoints(
                stage, block, (positions / scale * 2 - 1)[:, None], reference.expand_as(positions)[:, None],
                (h, w), model.feature_info[stage]['reduction'], True))
    finally:
        for _, _, attn in modules:
            attn.record_sampling = False
            attn.last_sampling = None
    return records


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


# ---------------------------------------------------------------------------- drawing

def _figure(panels: int, title: str, extra_width: float = 0.):
    from matplotlib.figure import Figure
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
    from matplotlib.collections import LineCollection
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
        ax.add_collection(LineCollection(segments, colors='white', linewidths=0.5, alpha=0.7))
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


# ---------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--figure', nargs='+', choices=(*FIGURES, 'all'), default=['all'],
                        help='figures to draw (default: all that apply to the model)')
    parser.add_argument('--model', help='registered model (default: the checkpoint\'s architecture, else dat_tiny, '
                                        'or eapt_small when only eapt-* figures are asked for)')
    parser.add_argument('--checkpoint', help='official DAT release file, converted .safetensors, or a deformvit '
                                             'classification training checkpoint (default: random weights)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights (default: 0)')
    parser.add_argument('--image', help='image file (default: the scikit-image photo --sample)')
    parser.add_argument('--sample', default='chelsea', choices=SAMPLE_PHOTOS,
                        help='scikit-image photo used without --image (default: chelsea)')
    parser.add_argument('--size', type=int, help='input side (default: the model\'s input size)')
    parser.add_argument('--stage', type=int, help='0-based stage: sampling-points and key-importance use its last '
                                                  'deformable block, query-keys too; eapt-* draw only this stage')
    parser.add_argument('--block', type=int, help='0-based block within --stage (a deformable block)')
    parser.add_argument('--group', type=int, help='offset group to draw (default: 0 for sampling-points, all '
                                                  'groups for key-importance and query-keys)')
    parser.add_argument('--head', type=int, help='attention head (default: the mean over heads)')
    parser.add_argument('--query', type=float, nargs=2, metavar=('X', 'Y'),
                        help='query pixel (column, row) of the displayed input for query-keys (default: the centre)')
    parser.add_argument('--top-k', type=int, default=32, help='keys drawn by key-importance and query-keys (default: 32)')
    parser.add_argument('--reduction', choices=('norm', 'mean'), default='norm',
                        help='channel reduction of eapt-heatmaps (default: L2 norm)')
    parser.add_argument('--edge-samples', type=int, default=EDGE_SAMPLES,
                        help=f'values per window edge in eapt-edges (default: {EDGE_SAMPLES}, as in EAPT)')
    parser.add_argument('--output', '-o', default='visualizations',
                        help='output folder, created if missing (default: visualizations)')
    parser.add_argument('--device', default='cpu', help='torch device (default: cpu)')


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


def run(args: argparse.Namespace) -> List[str]:
    """Draw the requested figures; returns the written PNG paths."""
    requested = args.figure
    eapt_only = all(f.startswith('eapt-') for f in requested)
    model, name, weights = load_model(args.model, args.checkpoint, args.seed,
                                      default='eapt_small' if eapt_only else 'dat_tiny')
    family = _family(model)
    has_deformable = bool(model.deformable_blocks()) if family == 'dat' else any(
        attn.offset_net is not None for _, _, attn in model.attention_modules())
    figures = _figures(requested, family, has_deformable)
    image = load_image(args.image, args.sample)
    x, display = preprocess(image, model, args.size)
    source = args.image or f'scikit-image "{args.sample}"'
    title = f'{name}, {weights}\n{source}, input {x.shape[-2]}x{x.shape[-1]}'
    device = torch.device(args.device)
    model, x = model.to(device), x.to(device)
    os.makedirs(args.output, exist_ok=True)
    strides = [info['reduction'] for info in model.feature_info]
    written = []

    def save(fig, figure: str) -> None:
        path = os.path.join(args.output, f'{name}-{figure}.png')
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
                      for p in eapt_sampling_points(model, x)]
        chosen = _select(points, args.stage, args.block, 'per-stage')
        label = 'DAT Fig. 6 style: deformed sampling points' if family == 'dat' else \
            'deformed key positions C(l + o) of EAPT Eq. (1)-(2), drawn as DAT Fig. 6'
        save(draw_sampling_points(display, [points[i] for i in chosen], args.group or 0, f'{label}\n{title}'),
             'sampling-points')
    if 'key-importance' in figures:
        layer = _select([r.sampling for r in records], args.stage, args.block, 'first')[0]
        importance = key_importance(records, layer, args.head)
        save(draw_key_importance(display, importance, args.top_k, args.group, f'DAT Fig. 5 style: most important keys\n{title}'),
             'key-importance')
    if 'query-keys' in figures:
        layer = _select([r.sampling for r in records], args.stage, args.block, 'last')[0]
        size = x.shape[-2:]
        query = (args.query[1], args.query[0]) if args.query else ((size[0] - 1) / 2, (size[1] - 1) / 2)
        result = query_keys(records[layer], query, tuple(size), args.head)
        save(draw_query_keys(display, result, args.top_k, args.group, f'DAT Fig. 7 style: keys of one query\n{title}'), 'query-keys')
    if 'eapt-heatmaps' in figures or 'eapt-edges' in figures:
        features = model.forward_intermediates(x, intermediates_only=True)
        num_stages = len(features)
        if args.stage is not None and not 0 <= args.stage < num_stages:
            raise ValueError(f'--stage {args.stage} is out of range: the model has stages 0-{num_stages - 1}')
        stages = [args.stage] if args.stage is not None else list(range(num_stages))
        if 'eapt-heatmaps' in figures:
            heatmaps = feature_heatmaps(features, args.reduction)
            save(draw_heatmaps(display, [h.cpu() for h in heatmaps], strides, stages,
                               f'EAPT Fig. 6 style: feature heat maps (channel {args.reduction})\n{title}'), 'eapt-heatmaps')
        if 'eapt-edges' in figures:
            windows = stage_windows(model, [f.shape[-2:] for f in features])
            usable = [s for s in stages if windows[s] is not None
                      and math.ceil(features[s].shape[-2] / windows[s][0]) * math.ceil(features[s].shape[-1] / windows[s][1]) > 1]
            if args.stage is not None and not usable:
                size = tuple(features[args.stage].shape[-2:])
                raise ValueError(f'stage {args.stage} ({size[0]}x{size[1]}) is a single window or has no windows: '
                                 'no edges between windows to compare')
            if usable:
                results = [edge_differences(features[s].detach().cpu(), windows[s], args.edge_samples) for s in usable]
                save(draw_edge_differences(display, results, strides, usable,
                                           f'EAPT Fig. 6 style: edge differences between adjacent windows\n{title}'), 'eapt-edges')
    return written


def main(args: argparse.Namespace) -> None:
    try:
        with torch.no_grad():
            written = run(args)
    except (ValueError, FileNotFoundError, UnsafeCheckpointError) as err:
        raise SystemExit(f'deformvit visualize: {err}') from err
    for path in written:
        print(path)
