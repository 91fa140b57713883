"""Convert official DAT release checkpoints to deformvit safetensors files."""
import json
import os
from typing import Optional

from ..checkpoint import check_output_file, load_state_dict_file, save_safetensors, unwrap_state_dict
from ..models.dat import infer_dat_variant
from ..tasks import create_model

__all__ = ['convert_checkpoint']


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
        dst: output path, ending in ``.safetensors`` and other than ``src``; written atomically.
        model_name: registered model the weights belong to; inferred when None.
        weights_only: refuse pickled non-tensor objects in ``src`` (see
            :func:`deformvit.load_state_dict_file`).
        **model_kwargs: extra ``timm.create_model`` arguments of a non-default model.

    Returns:
        The model name the file was written for.
    """
    check_output_file(dst, ('.safetensors',), 'converted', inputs=(src,))
    state_dict = unwrap_state_dict(load_state_dict_file(src, weights_only=weights_only))
    model_name = model_name or infer_dat_variant(state_dict)
    model = create_model(model_name, **model_kwargs)
    model.check_weights_layout(state_dict, src)  # another release or size than --model: both named
    converted = type(model).checkpoint_filter(state_dict, model)
    model.load_state_dict(converted, strict=True)
    metadata = {'architecture': model_name, 'model_kwargs': json.dumps(model_kwargs), 'source': os.path.basename(src)}
    save_safetensors(model.state_dict(), dst, metadata=metadata)
    return model_name
