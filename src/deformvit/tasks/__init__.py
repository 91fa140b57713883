"""Tasks on top of the backbones: classification, detection and semantic segmentation.

Each task (:class:`~deformvit.tasks.base.Task`) tells the shared training loop of
:mod:`deformvit.train` how to read its data, build its model, compute the loss of a batch
and evaluate; :func:`load_checkpoint` rebuilds the model of any task from a checkpoint, and
:func:`load_classifier` a classifier from any weights file it comes in.
"""
import contextlib
import os
from typing import Iterator, Optional, Tuple

import torch.nn as nn

from ..checkpoint import read_safetensors_metadata
from .base import Task, checkpoint_metadata

__all__ = ['TASKS', 'TaskMismatchError', 'build_model', 'get_task', 'load_checkpoint', 'load_classifier']

TASKS = ('classify', 'detect', 'segment')
_TASK_NAMES = {'classify': 'classification', 'detect': 'detection', 'segment': 'segmentation'}


class TaskMismatchError(ValueError):
    """A checkpoint of another task than the one asked for."""


def get_task(name: str) -> Task:
    """A fresh :class:`Task` by name (``'classify'``, ``'detect'`` or ``'segment'``)."""
    if name == 'classify':
        from .classification import ClassificationTask
        return ClassificationTask()
    if name == 'detect':
        from .detection import DetectionTask
        return DetectionTask()
    if name == 'segment':
        from .segmentation import SegmentationTask
        return SegmentationTask()
    raise ValueError(f'unknown task {name!r}; expected one of {", ".join(TASKS)}')


def build_model(task: str, architecture: str, **kwargs) -> nn.Module:
    """The model of ``task`` named ``architecture`` (a detector, a decoder or a timm model name)."""
    if task == 'detect':
        from .detectors import build_detector
        return build_detector(architecture, **kwargs)
    if task == 'segment':
        from .segmentors import build_segmentor
        return build_segmentor(architecture, **kwargs)
    import timm
    from .. import models  # noqa: F401  (registers the models)
    return timm.create_model(architecture, **kwargs)


def load_checkpoint(path: str, task: Optional[str] = None) -> Tuple[nn.Module, list, str]:
    """``(model, classes, task)`` rebuilt from a deformvit training checkpoint, in eval mode.

    Args:
        path: ``last.safetensors`` / ``best.safetensors`` of a training run.
        task: the task the caller expects; a checkpoint of another task is an error.

    Raises:
        FileNotFoundError, ValueError: no such file, not a deformvit checkpoint, or a
            checkpoint of another task.
    """
    from ..checkpoint import load_state_dict_file
    meta = checkpoint_metadata(path)
    if task is not None and meta['task'] != task:
        raise ValueError(f"{path} is a {meta['task']} checkpoint ({meta['architecture']}); expected a {task} one")
    model = build_model(meta['task'], meta['architecture'], **meta['model_kwargs'])
    model.load_state_dict(load_state_dict_file(path))
    return model.eval(), meta['classes'], meta['task']


@contextlib.contextmanager
def _weights_error(path: str) -> Iterator[None]:
    """Turn the RuntimeError of weights that do not fit the model into a ValueError naming the file."""
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        raise ValueError(message if path in message else f'{path} does not fit the model: {message}') from err


def load_classifier(path: str, name: Optional[str] = None, default: Optional[str] = None,
                    **model_kwargs) -> Tuple[nn.Module, str]:
    """``(model, architecture)``: a classification model in eval mode with the weights of ``path``.

    ``path`` is any file a classifier's weights come in: a deformvit training checkpoint or a
    ``deformvit convert`` output (``.safetensors`` recording its architecture), rebuilt by
    :func:`load_checkpoint`; or a bare state dict (an official DAT release file, a
    ``.safetensors`` without metadata) loaded by ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path))``.

    Args:
        path: the weights file.
        name: the registered model the weights are for; a recorded architecture must match it.
        default: the model of a bare state dict when ``name`` is None; None: the DAT variant
            whose shapes the weights have (an official DAT release file).
        **model_kwargs: ``timm.create_model`` arguments of a bare state dict; a checkpoint that
            records its architecture records its arguments too.

    Raises:
        FileNotFoundError: no such file.
        TaskMismatchError: a detection or segmentation checkpoint.
        ValueError: an unreadable file, another recorded architecture than ``name``, model
            arguments for a checkpoint that records its own, or weights that do not fit.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint file at {path}')
    metadata = {}
    if path.endswith('.safetensors'):
        try:
            metadata = read_safetensors_metadata(path)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f'{path} is not a readable safetensors file: {err}') from err
    if 'architecture' in metadata:
        task, architecture = metadata.get('task', 'classify'), metadata['architecture']
        if task != 'classify':
            raise TaskMismatchError(f'{path} is a {_TASK_NAMES.get(task, task)} checkpoint ({architecture})')
        if name is not None and name != architecture:
            raise ValueError(f'{path} holds a {architecture} model, not {name}')
        if model_kwargs:
            raise ValueError(f'{path} records its own model arguments; model arguments cannot be changed')
        with _weights_error(path):
            model, _, _ = load_checkpoint(path, 'classify')
        return model, architecture
    name = name or default
    if name is None:
        from ..checkpoint import load_state_dict_file
        from ..convert import infer_dat_variant
        name = infer_dat_variant(load_state_dict_file(path))
    import timm
    from .. import models  # noqa: F401  (registers the models)
    with _weights_error(path):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **model_kwargs)
    return model.eval(), name
