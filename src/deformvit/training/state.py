"""Resumable run state: weights and training state written atomically, RNG states, seeding.

Each epoch writes ``last.safetensors`` (the weights, whose metadata rebuilds the model, see
:func:`deformvit.checkpoint.metadata_for`) and ``last.state.pt`` (optimizer, scheduler, gradient
scaler, EMA, epoch, best score, RNG states and the resolved config).
"""
import os
import random
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import load_state_dict_file, read_safetensors_metadata, save_safetensors, save_torch

__all__ = ['load_training_state', 'rng_state', 'save_training_state', 'seed_everything', 'set_rng_state']


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def save_training_state(
        folder: str,
        name: str,
        model: nn.Module,
        metadata: Dict[str, str],
        state: Optional[Dict] = None,
) -> str:
    """Write ``name.safetensors`` (weights) and, given ``state``, ``name.state.pt`` (optimizer,
    scheduler, scaler, epoch, RNG states...), each atomically. Returns the weights path.

    The weights file is written last, so a ``.state.pt`` never describes weights that are not
    on disk yet; :func:`load_training_state` checks that both belong to the same epoch.
    """
    weights = os.path.join(folder, f'{name}.safetensors')
    if state is not None:
        save_torch(state, os.path.join(folder, f'{name}.state.pt'))
    save_safetensors(model.state_dict(), weights, metadata=metadata)
    return weights


def rng_state() -> Dict:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def load_training_state(folder: str, name: str = 'last') -> tuple:
    """``(weights state dict, metadata, training state)`` of a run folder's ``name`` checkpoint.

    Raises:
        FileNotFoundError: the folder holds no such checkpoint.
        ValueError: a file is not readable (empty, truncated), or weights and training state disagree (an
            interrupted write of an old version).
    """
    weights = os.path.join(folder, f'{name}.safetensors')
    state_path = os.path.join(folder, f'{name}.state.pt')
    if not (os.path.isfile(weights) and os.path.isfile(state_path)):
        raise FileNotFoundError(f'no resumable checkpoint in {folder}: expected {name}.safetensors and '
                                f'{name}.state.pt (written at the end of every epoch)')
    metadata = read_safetensors_metadata(weights)
    state = load_state_dict_file(state_path)
    if str(state.get('epoch')) != metadata.get('epoch'):
        raise ValueError(f'{weights} (epoch {metadata.get("epoch")}) and {state_path} (epoch {state.get("epoch")}) '
                         'do not belong together')
    return load_state_dict_file(weights), metadata, state
