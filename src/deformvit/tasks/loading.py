"""The one way from a name or a file to a model, used by every tool and command.

:func:`load_model` builds a model from

- a registered name (``dat_tiny``, ``eapt_small``, any timm model): random weights, or with the
  checkpoint ``official`` (or the name itself as the checkpoint) the official weights that
  ``timm.create_model(name, pretrained=True)`` downloads (:mod:`deformvit.hub`);
- an official DAT release file (``{'model': state_dict}``) or any bare state dict, with the
  model named or, for DAT, inferred from the weights' shapes;
- a ``deformvit convert`` output or a deformvit training checkpoint of any task: the
  ``.safetensors`` metadata names the architecture, its arguments and the classes
  (:func:`deformvit.checkpoint.checkpoint_record`).

A checkpoint of another task than the one asked for is a :class:`TaskMismatchError`; unknown
names are reported with the closest registered ones.
"""
import inspect
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import timm
import torch.nn as nn

from ..checkpoint import CheckpointRecord, checkpoint_record, load_state_dict_file, tensor_shapes
from ..errors import UsageError, closest
from ..hub import OFFICIAL, names_official, resolve_weights_spec
from ..models import DAT, EAPT, classifier_outputs, infer_dat_variant
from .detection import build_detector
from .segmentation import build_segmentor

__all__ = ['TASK_NAMES', 'LoadedModel', 'TaskMismatchError', 'build_model', 'check_model_name', 'create_model',
           'load_model']

TASK_NAMES = {'classify': 'classification', 'detect': 'detection', 'segment': 'segmentation'}
_WEIGHT_FILES = ('.pth', '.pt', '.bin', '.ckpt', '.safetensors')


class TaskMismatchError(ValueError):
    """A checkpoint of another task than the one asked for."""


@dataclass
class LoadedModel:
    """A model and what is known of it.

    Attributes:
        model: the network, in eval mode.
        architecture: the registered model (classification) or the detector / decoder name.
        task: ``'classify'``, ``'detect'`` or ``'segment'``.
        classes: class names in output order, when the file records them.
        source: the weights file, the page of official weights, or the name of a randomly initialised model.
        weights: the weights in words (``'weights best.safetensors'``, ``'random weights, untrained'``).
    """
    model: nn.Module
    architecture: str
    task: str
    classes: Optional[List[str]]
    source: str
    weights: str


def check_model_name(name: str) -> None:
    """Raise :class:`~deformvit.errors.UsageError` (a ``ValueError``) for a name that is no registered model,
    naming the closest ones."""
    if isinstance(name, str) and timm.is_model(name):
        return
    hint = (closest(name, timm.list_models()) if isinstance(name, str) else '') or '; see timm.list_models()'
    raise UsageError(f'unknown model {name!r}: expected a registered model (deformvit\'s dat_*, datpp_* and eapt_*, or '
                     f'any timm model) or a weights file{hint}')


def create_model(name: str, size: Optional[int] = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` after :func:`check_model_name` (random weights unless ``kwargs`` ask
    for pretrained ones).

    When ``size`` differs from the model's default input size and the model takes an ``img_size``
    argument (ViTs, Swin, DAT, EAPT), it is built for ``size``.
    """
    check_model_name(name)
    if size is not None and size < 1:
        raise UsageError(f'size must be a positive input side in pixels, got {size}')
    cfg = timm.models.get_pretrained_cfg(name)
    default_size = cfg.input_size[-1] if cfg is not None else None
    if size is not None and size != default_size and 'img_size' not in kwargs:
        try:
            return _create(name, img_size=size, **kwargs)
        except UsageError:  # a model without img_size: built for its own size
            pass
    return _create(name, **kwargs)


def _create(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with an argument the model does not take reported as a
    :class:`~deformvit.errors.UsageError` naming it."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected is None:
            raise
        raise UsageError(f'{name} takes no argument {unexpected.group(1)!r}; its arguments: '
                         f'{", ".join(_arguments(name))}') from err


def _arguments(name: str) -> List[str]:
    """The keyword arguments of the model class behind ``name`` (ours; for other timm models, a pointer)."""
    family = next((cls for prefix, cls in (('dat_', DAT), ('eapt_', EAPT)) if name.startswith(prefix)), None)
    if family is None:
        return ["those of the model's class in timm"]
    return [p for p in inspect.signature(family).parameters if p != 'kwargs']


def build_model(task: str, architecture: str, **kwargs) -> nn.Module:
    """The model of ``task`` named ``architecture`` (a detector, a decoder or a registered model), untrained."""
    if task == 'detect':
        return build_detector(architecture, **kwargs)
    if task == 'segment':
        return build_segmentor(architecture, **kwargs)
    if task != 'classify':
        raise ValueError(f'unknown task {task!r}; expected one of {", ".join(TASK_NAMES)}')
    return create_model(architecture, **kwargs)


def _with_weights(path: str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``, with the RuntimeError of weights that do not fit the model turned into a ValueError naming
    ``path``."""
    try:
        return build()
    except RuntimeError as err:
        message = str(err)
        raise ValueError(message if path in message else f'{path} does not fit the model: {message}') from err


def _looks_like_a_file(text: str) -> bool:
    return text.endswith(_WEIGHT_FILES) or os.sep in text


def load_model(model: Optional[str] = None, checkpoint: Optional[str] = None, task: Optional[str] = None,
               default: Optional[str] = None, size: Optional[int] = None, **model_kwargs) -> LoadedModel:
    """A model in eval mode from a registered name, a weights file, or both.

    Args:
        model: a registered model name, or a weights file (then ``checkpoint`` must be None).
        checkpoint: the weights of the named model (any kind of file listed in the module's
            docstring); ``'official'``: its official weights (``pretrained=True``), as is a
            registered model's name; None with a name: random weights (seed them with
            ``torch.manual_seed``).
        task: the task the caller expects (``'classify'``, ``'detect'``, ``'segment'``); None
            accepts any. A name alone is a classification model.
        default: the model used when neither ``model`` nor the file names one; None: for a
            bare state dict, the DAT variant its shapes belong to.
        size: with a name alone: build it for this input side (see :func:`create_model`).
        **model_kwargs: model arguments. A file that records its architecture records its
            arguments: only a classifier's may be changed (e.g. ``img_size``; position tables
            are resized by the family's checkpoint filter), never its number of classes.

    Returns:
        :class:`LoadedModel`.

    Raises:
        FileNotFoundError: no such file.
        TaskMismatchError: a checkpoint of another task.
        ValueError: an unknown name, an unreadable file, another recorded architecture than
            ``model``, arguments a file cannot take, or weights that do not fit.
        WeightsDownloadError: official weights that are not cached could not be downloaded
            (:mod:`deformvit.hub`).
    """
    name, path = model, checkpoint
    if model is None and names_official(checkpoint):  # 'official', or a model's name as its weights
        name = default if checkpoint == OFFICIAL else checkpoint
        if name is None:
            raise UsageError(f"'{OFFICIAL}' weights of which model? name it (e.g. --model dat_tiny)")
    if path is not None and name is not None and timm.is_model(name) and \
            resolve_weights_spec(path, name) == OFFICIAL:
        if task not in (None, 'classify'):
            raise UsageError(f'the official {name} weights are a classifier\'s; a {TASK_NAMES.get(task, task)} model '
                             'comes from a checkpoint of its training run')
        _check_classes(f'the official {name} weights', _official_classes(name), model_kwargs)
        network = create_model(name, size, pretrained=True, **model_kwargs).eval()
        cfg = network.pretrained_cfg
        return LoadedModel(network, name, 'classify', None, cfg.get('origin_url') or cfg.get('url') or name,
                           f"official {name} weights ({cfg.get('description') or 'pretrained=True'})")
    if model is not None and not timm.is_model(model):
        if os.path.isfile(model) or _looks_like_a_file(model):
            if checkpoint is not None:
                raise UsageError(f'{model} is a file; name the model it belongs to instead '
                                 f'(e.g. dat_tiny --checkpoint {checkpoint}), or drop --checkpoint')
            name, path = None, model
        else:
            check_model_name(model)
    if path is None:
        name = name or default
        if name is None:
            raise UsageError('name a model or a weights file')
        if task not in (None, 'classify'):
            raise UsageError(f'{name} is a classification model; a {TASK_NAMES.get(task, task)} model comes from '
                             'a checkpoint of its training run')
        return LoadedModel(create_model(name, size, **model_kwargs).eval(), name, 'classify', None, name,
                           'random weights, untrained')
    record = checkpoint_record(path)
    if record is not None:
        loaded = _from_record(path, record, name, task, model_kwargs)
    else:
        if task not in (None, 'classify'):
            raise ValueError(f'{path} does not record its architecture; expected a checkpoint written by a deformvit '
                             'training run (last.safetensors or best.safetensors)')
        name = name or default or infer_dat_variant(load_state_dict_file(path))
        check_model_name(name)
        if 'num_classes' in model_kwargs:  # else the model takes the file's count (build_pyramid)
            _check_classes(path, classifier_outputs(tensor_shapes(path)), model_kwargs)
        network = _with_weights(path, lambda: _create(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **model_kwargs))
        loaded = LoadedModel(network, name, 'classify', None, path, f'weights {os.path.basename(path)}')
    loaded.model.eval()
    return loaded


def _official_classes(name: str) -> Optional[int]:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.num_classes if cfg is not None else None


def _check_classes(path: str, file_classes: Optional[int], model_kwargs: Dict) -> None:
    """Refuse a ``num_classes`` other than the file's (loading for inference: a new classifier would be random)."""
    asked = model_kwargs.get('num_classes')
    if file_classes and asked is not None and asked != file_classes:
        raise UsageError(f'{path} predicts {file_classes} classes; num_classes={asked} would replace its classifier '
                         f'with a random one: drop num_classes (the model takes the file\'s {file_classes}), or '
                         'fine-tune with `deformvit train --pretrained`')


def _from_record(path: str, record: CheckpointRecord, name: Optional[str], task: Optional[str],
                 model_kwargs: Dict) -> LoadedModel:
    """The model a ``.safetensors`` file records, checked against what the caller asked for."""
    if task is not None and record.task != task:
        raise TaskMismatchError(f'{path} is a {TASK_NAMES.get(record.task, record.task)} checkpoint '
                                f'({record.architecture}); expected a {TASK_NAMES.get(task, task)} one')
    if name is not None and name != record.architecture:
        raise UsageError(f'{path} holds a {record.architecture} model, not {name}')
    if model_kwargs and record.task != 'classify':
        raise ValueError(f'{path} records its own model arguments; a {TASK_NAMES[record.task]} model cannot be '
                         'rebuilt with others')
    _check_classes(path, record.model_kwargs.get('num_classes'), model_kwargs)
    if model_kwargs:  # through the family's checkpoint filter, which fits size-dependent tables
        network = _with_weights(path, lambda: _create(
            record.architecture, pretrained=True, pretrained_cfg_overlay=dict(file=path),
            **dict(record.model_kwargs, **model_kwargs)))
    else:
        network = build_model(record.task, record.architecture, **record.model_kwargs)
        _with_weights(path, lambda: network.load_state_dict(load_state_dict_file(path)))
    return LoadedModel(network, record.architecture, record.task, record.classes, path,
                       f'weights {os.path.basename(path)}')
