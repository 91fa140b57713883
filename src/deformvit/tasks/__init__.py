"""Tasks on top of the backbones: classification, detection and semantic segmentation.

Each task (:class:`~deformvit.tasks.base.Task`) tells the shared training loop of
:mod:`deformvit.train` how to read its data, build its model, compute the loss of a batch
and evaluate; :func:`load_checkpoint` rebuilds the model of any task from a checkpoint.
"""
from typing import Optional, Tuple

import torch.nn as nn

from .base import Task, checkpoint_metadata

__all__ = ['TASKS', 'build_model', 'get_task', 'load_checkpoint']

TASKS = ('classify', 'detect', 'segment')


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
