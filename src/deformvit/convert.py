"""Convert official DAT release checkpoints to deformvit safetensors files."""
import os
from typing import Dict, Optional

import timm
import torch

from .checkpoint import load_state_dict_file, save_safetensors, unwrap_state_dict
from .models.dat import checkpoint_filter_fn

__all__ = ['convert_checkpoint', 'infer_dat_variant']

_VARIANTS = {
    # (stem channels, stage-3 depth, local window): model name
    (96, 6, 7): 'dat_tiny',
    (96, 18, 7): 'dat_small',
    (128, 18, 7): 'dat_base',
    (128, 18, 12): 'dat_base_384',
}


def infer_dat_variant(state_dict: Dict[str, torch.Tensor]) -> str:
    """Name of the released DAT model a state dict (official or ours) belongs to.

    Raises:
        ValueError: the layout matches none of ``dat_tiny``, ``dat_small``, ``dat_base``,
            ``dat_base_384``.
    """
    state_dict = unwrap_state_dict(state_dict)
    if 'patch_proj.0.weight' in state_dict:  # official layout
        stem = state_dict['patch_proj.0.weight'].shape[0]
        depth = len({k.split('.')[3] for k in state_dict if k.startswith('stages.2.attns.')})
        table = state_dict.get('stages.0.attns.0.relative_position_bias_table')
    elif 'stem.conv.weight' in state_dict:
        stem = state_dict['stem.conv.weight'].shape[0]
        depth = len({k.split('.')[3] for k in state_dict if k.startswith('stages.2.blocks.')})
        table = state_dict.get('stages.0.blocks.0.attn.relative_position_bias_table')
    else:
        raise ValueError('not a DAT state dict: it has neither patch_proj.0.weight (official layout) '
                         'nor stem.conv.weight (deformvit layout)')
    window = int(round(((table.shape[0] ** 0.5) + 1) / 2)) if table is not None else 7
    key = (stem, depth, window)
    if key not in _VARIANTS:
        raise ValueError(f'a DAT model with stem width {stem}, {depth} stage-3 blocks and window {window} is not '
                         f'one of the released ones; name it explicitly (--model)')
    return _VARIANTS[key]


def convert_checkpoint(
        src: str,
        dst: str,
        model_name: Optional[str] = None,
        weights_only: bool = True,
        **model_kwargs,
) -> str:
    """Read an official DAT checkpoint and write it as a deformvit ``.safetensors`` file.

    The converted weights are loaded strictly into the model before writing, so a written
    file always fits ``timm.create_model(model_name)``.

    Args:
        src: official ``.pth`` file (``{'model': state_dict}``) or a deformvit file.
        dst: output path (``.safetensors``); written atomically.
        model_name: registered model the weights belong to; inferred when None.
        weights_only: refuse pickled non-tensor objects in ``src`` (see
            :func:`deformvit.load_state_dict_file`).
        **model_kwargs: extra ``timm.create_model`` arguments of a non-default model.

    Returns:
        The model name the file was written for.
    """
    state_dict = unwrap_state_dict(load_state_dict_file(src, weights_only=weights_only))
    model_name = model_name or infer_dat_variant(state_dict)
    model = timm.create_model(model_name, **model_kwargs)
    converted = checkpoint_filter_fn(state_dict, model)
    model.load_state_dict(converted, strict=True)
    save_safetensors(model.state_dict(), dst, metadata={'architecture': model_name, 'source': os.path.basename(src)})
    return model_name
