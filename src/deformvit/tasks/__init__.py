"""Tasks on top of the backbones: classification, detection and semantic segmentation.

Each task (:class:`~deformvit.tasks.base.Task`) tells the shared training loop of
:mod:`deformvit.training` how to read its data, build its model, compute the loss of a batch
and evaluate. :func:`build_detector` and :func:`build_segmentor` build the dense frameworks
by name (:data:`DETECTORS`, :data:`SEGMENTORS`); :func:`load_model` builds any model from a
name or a weights file.
"""
from typing import Dict, Type

from .base import Evaluation, Task
from .classification import ClassificationTask
from .detection import DETECTORS, build_detector
from .detection.task import DetectionTask
from .loading import TASK_NAMES, LoadedModel, TaskMismatchError, build_model, check_model_name, create_model, load_model
from .segmentation import SEGMENTORS, build_segmentor
from .segmentation.task import SegmentationTask

__all__ = [
    'DETECTORS', 'SEGMENTORS', 'TASKS', 'TASK_NAMES', 'Evaluation', 'LoadedModel', 'Task', 'TaskMismatchError',
    'build_detector', 'build_model', 'build_segmentor', 'check_model_name', 'create_model', 'get_task', 'load_model',
]

TASKS: Dict[str, Type[Task]] = {
    'classify': ClassificationTask,
    'detect': DetectionTask,
    'segment': SegmentationTask,
}


def get_task(name: str) -> Task:
    """The :class:`Task` named ``name`` (``'classify'``, ``'detect'`` or ``'segment'``)."""
    if name not in TASKS:
        raise ValueError(f'unknown task {name!r}; expected one of {", ".join(TASKS)}')
    return TASKS[name]()
