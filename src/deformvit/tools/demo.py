"""``deformvit demo``: classify a real photo with DAT-T and show what its deformable attention
samples.

Runs on CPU in seconds: it loads a photo shipped with scikit-image (or ``--image``),
preprocesses it with timm's eval transform, prints the top-5 classes, the four feature maps
(the ``features_only`` pyramid) and the deformed sampling points of one deformable block
(DAT's deformed points, or EAPT's moved key positions).
Without ``--checkpoint`` the weights are random, so the classes are arbitrary; the shapes and
sampling mechanics are the real ones.
"""
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from ..models import PyramidBackbone

__all__ = ['demo_report']


@torch.no_grad()
def demo_report(model: nn.Module, name: str, weights: str, image: Image.Image, source: str,
                classes: Optional[Sequence[str]] = None) -> List[str]:
    """The demo's report of ``model`` (a DAT or EAPT classifier in eval mode) on ``image``, as lines.

    Args:
        model: the classifier; ``name`` its architecture and ``weights`` its weights in words.
        image: an RGB image; ``source`` where it came from.
        classes: the names of the model's classes (default: ImageNet-1k's for a 1000-class model, else
            ``class <i>``).

    Raises:
        ValueError: ``model`` is not a DAT or EAPT model.
    """
    if not isinstance(model, PyramidBackbone):
        raise ValueError(f'{name} is a {type(model).__name__}; the demo shows the deformable blocks of DAT and EAPT '
                         'models (dat_tiny, eapt_small, ...)')
    x = create_transform(**resolve_data_config({}, model=model))(image).unsqueeze(0)
    lines = [f'{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, weights: {weights}',
             f'image: {source}, {image.size[0]}x{image.size[1]} -> input {tuple(x.shape)}']

    logits, records = model.forward_sampling_points(x)
    probs = logits.softmax(-1)[0]
    if classes:
        describe = classes.__getitem__
    elif getattr(model, 'num_classes', 0) == 1000:  # ImageNet-1k's classifier (official weights): its names
        describe = ImageNetInfo().index_to_description
    else:
        describe = 'class {}'.format
    lines.append('top-5 classes:')
    for p, i in zip(*probs.topk(min(5, probs.numel()))):
        lines.append(f'  {i.item():4d} {describe(i.item()):<40} {p.item():.4f}')

    lines.append('feature maps (features_only / forward_intermediates, NCHW):')
    for feature_info, feat in zip(model.feature_info, model.forward_intermediates(x, intermediates_only=True)):
        lines.append(f"  {feature_info['module']}: {tuple(feat.shape)}  stride {feature_info['reduction']}")

    if not records:
        lines.append('the model has no deformable block')
        return lines
    record = records[-1]
    _, groups, hk, wk, _ = record.points.shape
    points = record.to_pixels('points')[0]
    offsets = points - record.to_pixels('reference')[0]
    lines += [
        f'deformable block stages.{record.stage}.blocks.{record.block}: {groups} offset groups x {hk}x{wk} '
        f'reference points over its {record.feature_size[0]}x{record.feature_size[1]} input map '
        f'(stride {record.stride})',
        f'  offsets in input pixels: mean |dy|={offsets[..., 0].abs().mean():.2f}, '
        f'mean |dx|={offsets[..., 1].abs().mean():.2f}, max={offsets.abs().max():.2f}',
        '  first deformed points of group 0 as (y, x) input pixels:',
        '    ' + '  '.join(f'({py:.1f}, {px:.1f})' for py, px in np.asarray(points[0, 0, :4]))]
    return lines
