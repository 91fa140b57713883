"""Reading and writing weight files safely, and what a deformvit checkpoint records.

Reading never unpickles arbitrary objects unless asked to (``weights_only=True``);
writing is atomic (a temporary file in the same folder, then ``os.replace``), so an
interrupted write never leaves a truncated file behind.

A deformvit ``.safetensors`` file records in its metadata how to rebuild its model: the task,
the architecture (a registered model, detector or decoder name), its arguments and the class
names (:func:`metadata_for` writes them, :func:`checkpoint_record` reads them back).
"""
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UsageError

__all__ = [
    'CheckpointRecord', 'UnsafeCheckpointError', 'check_output_file', 'check_output_folder', 'checkpoint_record',
    'load_state_dict_file', 'metadata_for',
    'read_safetensors_metadata', 'save_safetensors', 'save_torch', 'tensor_shapes', 'unwrap_state_dict',
    'write_atomically',
]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds pickled Python objects besides tensors and was not trusted."""


def load_state_dict_file(path: str, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """Load the tensors of a ``.safetensors`` or ``torch.save`` file.

    Args:
        path: file to read.
        weights_only: refuse pickled objects other than tensors and containers (default).
            Training checkpoints of the DAT release also pickle a config object; pass False
            only for files you trust.

    Returns:
        The file's top-level dict (e.g. ``{'model': state_dict}``) or state dict.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs unpickling of other objects.
        ValueError: the file is neither a safetensors nor a readable torch file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint file at {path}')
    if path.endswith('.safetensors'):
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f'{path} is not a readable safetensors file: {err}') from err
    try:
        return torch.load(path, map_location='cpu', weights_only=weights_only)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if weights_only and unsafe:
            raise UnsafeCheckpointError(
                f'{path} holds pickled Python objects besides tensors ({", ".join(unsafe)}; training checkpoints '
                f'of the DAT release carry a config object). Loading it would run code from the file, so it was '
                f'refused. If you trust the file, convert it once with '
                f'`deformvit convert {path} OUT.safetensors --trust-pickle` (or call '
                f'load_state_dict_file(path, weights_only=False)) and load OUT.safetensors instead.') from err
        raise ValueError(f'{path} is not a readable PyTorch checkpoint: {str(err).splitlines()[0]}') from err
    except (RuntimeError, EOFError, OSError) as err:  # a cut-off zip file can also fail as EINVAL
        raise ValueError(f'{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}') from err


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """The string metadata stored in a ``.safetensors`` file's header (empty if none).

    Raises:
        ValueError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(os.fspath(path), 'pt') as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f'{path} is not a readable safetensors file: {err}') from err


def tensor_shapes(path: str, weights_only: bool = True) -> Dict[str, Tuple[int, ...]]:
    """The shape of every tensor of a weights file (of its state dict, for a wrapped one), read without
    loading the tensors where the format allows: a safetensors header, or a ``torch.save`` zip file
    memory-mapped.

    Raises:
        FileNotFoundError, UnsafeCheckpointError, ValueError: as :func:`load_state_dict_file`.
    """
    path = os.fspath(path)
    if path.endswith('.safetensors') and os.path.isfile(path):
        try:
            with safe_open(path, 'pt') as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f'{path} is not a readable safetensors file: {err}') from err
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=weights_only, mmap=True)
    except Exception:  # not a zip file (or not readable): the full reader reports what is wrong
        checkpoint = load_state_dict_file(path, weights_only)
    state_dict = unwrap_state_dict(checkpoint) if isinstance(checkpoint, dict) else {}
    return {k: tuple(v.shape) for k, v in state_dict.items() if torch.is_tensor(v)}


@dataclass
class CheckpointRecord:
    """How to rebuild the model of a deformvit checkpoint.

    Attributes:
        task: ``'classify'``, ``'detect'`` or ``'segment'``.
        architecture: the registered model (classification) or the detector / decoder name.
        model_kwargs: the arguments that rebuild the model with ``architecture``.
        classes: class names in output order; None when the file does not record them
            (``deformvit convert`` outputs).
        metadata: the file's whole metadata.
    """
    task: str
    architecture: str
    model_kwargs: Dict
    classes: Optional[List[str]]
    metadata: Dict[str, str]


def metadata_for(architecture: str, model_kwargs: Dict, classes: List[str], epoch: int, task: str = 'classify',
                 **extra) -> Dict[str, str]:
    """The safetensors metadata of a training checkpoint, from which :func:`checkpoint_record` rebuilds it."""
    return {'task': task, 'architecture': architecture, 'model_kwargs': json.dumps(model_kwargs),
            'classes': json.dumps(classes), 'epoch': str(epoch), **{k: str(v) for k, v in extra.items()}}


def checkpoint_record(path: str) -> Optional[CheckpointRecord]:
    """What a ``.safetensors`` file records about its model; None for other files and bare state dicts.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable safetensors file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint file at {path}')
    if not path.endswith('.safetensors'):
        return None
    metadata = read_safetensors_metadata(path)
    if 'architecture' not in metadata:
        return None
    return CheckpointRecord(
        task=metadata.get('task', 'classify'), architecture=metadata['architecture'],
        model_kwargs=json.loads(metadata.get('model_kwargs', '{}')),
        classes=json.loads(metadata['classes']) if 'classes' in metadata else None, metadata=metadata)


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``'model'``, ``'state_dict'`` or ``'model_ema'``)."""
    for wrapper in ('model', 'state_dict', 'model_ema'):
        if isinstance(checkpoint.get(wrapper), dict):
            return checkpoint[wrapper]
    return checkpoint


def _unsafe_globals(path: str) -> list:
    """Python objects other than tensors that a ``torch.save`` zip file would unpickle."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all
        return []


def _writable_ancestor(path: str) -> str:
    """The nearest existing folder at or above ``path``, checked to be a writable folder."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f'cannot create {path}: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'cannot write {path}: {existing} is not writable; choose another output')
    return existing


def check_output_folder(path: str, what: str = 'output folder') -> str:
    """Check, before any work and without creating anything, that ``path`` can be the folder of the outputs:
    an existing folder or a new one in a writable place, not a file.

    Raises:
        UsageError: ``path`` is a file, is under a file, or cannot be written.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'the {what} {path} is a file; expected a folder (new or existing)')
    _writable_ancestor(path)
    return path


def check_output_file(path: str, suffixes: Sequence[str] = (), what: str = 'output', inputs: Sequence[str] = ()) -> str:
    """Check, before any work, that ``path`` can be written as a file: a name ending in one of ``suffixes``
    (any, when empty) in an existing writable folder, neither a folder nor one of ``inputs``.

    An existing file of that name is replaced (atomically, once the new one is complete), as naming it asks.

    Raises:
        UsageError: any of the above does not hold.
    """
    path = os.fspath(path)
    if suffixes and not path.endswith(tuple(suffixes)):
        raise UsageError(f'{what} files are written as {" or ".join(suffixes)}; got {path}')
    if os.path.isdir(path):
        raise UsageError(f'{path} is a folder; expected a file name such as '
                         f'{os.path.join(path, "name" + (suffixes[0] if suffixes else ""))}')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f'the output folder {folder} does not exist; create it first')
    _writable_ancestor(folder)
    for source in inputs:
        if os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise UsageError(f'{path} is also the input; writing it would replace the input: choose another name')
    return path


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str, write: Callable[[str], Optional[bool]]) -> bool:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file gets the mode ``open()`` would give it (the temporary file is private until then).
    When ``write`` raises or returns False (a written file that failed a check), the temporary
    file is deleted and ``path`` is left as it was. Returns True when ``path`` was written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        if write(tmp) is False:
            return False
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``state_dict`` to ``path`` in safetensors format, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch(obj, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp))
