"""What the shared training loop (:mod:`deformvit.train`) needs to know about a task.

One loop trains every task on one device or many: recipes and overrides, DDP, AMP,
gradient accumulation and clipping, EMA, atomic checkpoints with exact resume, progress
bars, CSV/TensorBoard logs. A :class:`Task` supplies the rest: its recipe fields, data,
model, the loss of a batch, the evaluation and the figures of a finished run.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint import UnsafeCheckpointError, read_safetensors_metadata
from ..data import IMAGE_EXTENSIONS, DatasetError, _find_images

__all__ = ['COMMON_DEFAULTS', 'Evaluation', 'Task', 'add_train_command', 'checkpoint_metadata', 'class_colors', 'guarded', 'iter_images']

COMMON_DEFAULTS = dict(
    description='', task='classify', data=None, epochs=300, iterations=None, batch_size=128, accum_steps=1,
    opt='adamw', lr=None, lr_base=1e-3, lr_base_size=1024, sched='cosine', min_lr=1e-7, warmup_lr=1e-6,
    warmup_epochs=20, warmup_updates=None, decay_epochs=[], decay_rate=0.1, poly_power=1.0, weight_decay=0.05,
    clip_grad=None, drop_path=0.0, model_ema=False, ema_decay=0.9998, eval_every=1, workers=4, seed=0,
    device='auto', precision='auto', compile=False, grad_checkpointing=False, channels_last=False, pretrained=None,
    output=None,
)
COMMON_FLAGS = ('data', 'epochs', 'batch_size', 'accum_steps', 'lr', 'workers', 'seed', 'device', 'precision',
                'output', 'pretrained')


@dataclass
class Evaluation:
    """Metrics of one evaluation (``metrics`` keys include the task's ``metrics``)."""
    metrics: Dict[str, float]
    images: int = 0
    skipped: int = 0
    detail: Any = None  # task-specific (confusion matrix, per-class values...)


@dataclass
class Task:
    """A task's part of training: subclasses fill in the fields and override the methods.

    Attributes:
        name: ``'classify'``, ``'detect'`` or ``'segment'`` (the ``task`` field of recipes).
        command: the command that trains it, for messages.
        defaults: recipe fields of the task, added to :data:`COMMON_DEFAULTS`.
        flags: recipe fields that have a command-line flag besides the common ones.
        metrics: evaluation metrics logged every epoch; the first selects ``best.safetensors``.
        model_field: the recipe field naming the (backbone) model, for run folders and
            per-model ``drop_path`` tables.
    """
    name: str = ''
    command: str = ''
    defaults: Dict = field(default_factory=dict)
    flags: Tuple[str, ...] = ()
    metrics: Tuple[str, ...] = ()
    model_field: str = 'model'
    find_unused_parameters: bool = False

    def default_recipe(self, data: Optional[str]) -> str:
        raise NotImplementedError

    def datasets(self, config: Dict) -> Tuple[Any, Any]:
        """``(train, val)`` datasets, each with ``classes``."""
        raise NotImplementedError

    def collate(self, batch: Sequence) -> Tuple[Any, Any, int]:
        """``(inputs, targets, skipped)`` of a batch; ``inputs`` is None when every sample was unreadable."""
        raise NotImplementedError

    def eval_batch_size(self, config: Dict) -> int:
        """Images per evaluation batch: the recipe's ``eval_batch_size`` if it has one, else ``batch_size``."""
        return config.get('eval_batch_size') or config['batch_size']

    def build_model(self, config: Dict, classes: List[str]) -> Tuple[nn.Module, str, Dict]:
        """``(model, architecture, rebuild kwargs)``; the kwargs and architecture go into checkpoints."""
        raise NotImplementedError

    def step(self, model: nn.Module, inputs: Any, targets: Any, device: torch.device) -> Tuple[torch.Tensor, int]:
        """Move a batch to ``device`` and return ``(loss, number of images)``; runs under autocast."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, ctx, autocast: Callable, config: Dict) -> Evaluation:
        raise NotImplementedError

    def describe(self, evaluation: Evaluation) -> str:
        """The metrics part of the per-epoch line."""
        return ', '.join(f'{k} {evaluation.metrics[k]:.2f}' for k in self.metrics)

    def reports(self, folder: str, rows: List[Dict], evaluation: Evaluation, classes: List[str]) -> List[str]:
        """Write the figures of a finished run; return lines naming them."""
        return []


def checkpoint_metadata(path: str) -> Dict:
    """``task``, ``architecture``, ``model_kwargs`` and ``classes`` recorded in a deformvit checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a deformvit ``.safetensors`` training checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint file at {path}')
    if not path.endswith('.safetensors'):
        raise ValueError(f'{path}: expected a .safetensors checkpoint written by a deformvit training run')
    metadata = read_safetensors_metadata(path)
    if 'architecture' not in metadata:
        raise ValueError(f'{path} does not record its architecture; expected a checkpoint written by a deformvit '
                         'training run (last.safetensors or best.safetensors)')
    return dict(task=metadata.get('task', 'classify'), architecture=metadata['architecture'],
                model_kwargs=json.loads(metadata.get('model_kwargs', '{}')),
                classes=json.loads(metadata['classes']) if 'classes' in metadata else None)


def _image_files(inputs: Sequence[str]) -> List[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files.extend(_find_images(item))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f'{item} is neither an image file nor a folder')
    if not files:
        raise DatasetError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(inputs)}')
    return files


def iter_images(inputs: Sequence[str]):
    """``(path, RGB PIL image)`` for each image file of ``inputs`` (files or folders); None for unreadable ones.

    Raises:
        FileNotFoundError: an input is neither a file nor a folder.
        DatasetError: the inputs hold no image files.
    """
    from PIL import Image
    for path in _image_files(inputs):
        try:
            with Image.open(path) as image:
                yield path, image.convert('RGB')
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            yield path, None


def guarded(func, command: str):
    """``func(args)``, turning data, file and checkpoint errors into a message and exit status 1."""

    def run(args):
        try:
            return func(args)
        except (DatasetError, ValueError, FileNotFoundError, UnsafeCheckpointError) as err:
            print(f'{command}: {err}', file=sys.stderr)
            raise SystemExit(1) from err
    return run


def add_train_command(commands, task_type: type, help: str, description: str, data_help: str) -> None:
    """The ``train`` sub-command of a dense task: the shared training flags plus ``--data`` and ``--backbone``."""
    from .. import train
    parser = commands.add_parser('train', help=help, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help=f'{data_help}; default: the embedded digit scenes')
    parser.add_argument('--backbone', help='registered model: dat_tiny, eapt_small, ... or a timm model')
    train.add_arguments(parser, task_type())
    parser.set_defaults(func=lambda args: train.main(args, task_type()))


def class_colors(num_classes: int) -> List[Tuple[int, int, int]]:
    """One RGB colour (0-255) per class index, from matplotlib's ``tab20`` (repeating after 20)."""
    import matplotlib
    cmap = matplotlib.colormaps['tab20']
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]
