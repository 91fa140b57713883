"""What the shared training loop (:mod:`deformvit.training`) needs to know about a task.

One loop trains every task on one device or many: recipes and overrides, DDP, AMP,
gradient accumulation and clipping, EMA, atomic checkpoints with exact resume, progress
bars, CSV/TensorBoard logs. A :class:`Task` supplies the rest: its recipe fields and flags,
data, model, the loss of a batch, the evaluation and the figures of a finished run.

A task keeps no state: every method computes its answer from the resolved config (and the
classes of the data) it is given, so the methods may be called in any order, and as often as
wanted.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

__all__ = ['Evaluation', 'Step', 'Task', 'registered']

T = TypeVar('T')

# The loss of one training batch: ``step(model, inputs, targets, device) -> (loss, images)``, run
# under autocast; a None loss skips the batch.
Step = Callable[[nn.Module, Any, Any, torch.device], Tuple[Optional[torch.Tensor], int]]


@dataclass
class Evaluation:
    """Metrics of one evaluation (``metrics`` keys include the task's ``metrics``)."""
    metrics: Dict[str, float]
    images: int = 0
    skipped: int = 0
    detail: Any = None  # task-specific (confusion matrix, per-class values...)


class Task:
    """A task's part of training; subclasses set the attributes and override the methods.

    Attributes:
        name: ``'classify'``, ``'detect'`` or ``'segment'`` (the ``task`` field of recipes).
        command: the command that trains it, for messages.
        defaults: recipe fields of the task, added to the common ones of
            :mod:`deformvit.training.config`.
        flags: recipe fields that have a command-line flag besides the common ones.
        model_field: the recipe field naming the (backbone) model, for run folders and
            per-model ``drop_path`` tables.
        find_unused_parameters: DDP must look for parameters without gradients.
        recipes: ``(without data, with data)``: the recipes used without ``--recipe``, the built-in
            job's and the paper's.
        metric_names: the evaluation metrics, when they do not depend on the config.
    """
    name: str = ''
    command: str = ''
    defaults: Dict = {}
    flags: Tuple[str, ...] = ()
    model_field: str = 'model'
    find_unused_parameters: bool = False
    recipes: Tuple[str, str] = ('', '')
    metric_names: Tuple[str, ...] = ()

    def add_arguments(self, parser) -> None:
        """Add the task's own command-line flags (its data, model and framework) to an argparse parser."""

    def default_recipe(self, data: Optional[str]) -> str:
        """The recipe used without ``--recipe``: the built-in job without data, the paper's with it."""
        return self.recipes[data is not None]

    def run_name(self, config: Dict) -> str:
        """The model part of a run folder's default name."""
        return str(config[self.model_field])

    def metrics(self, config: Dict) -> Tuple[str, ...]:
        """The evaluation metrics logged every epoch; the first selects ``best.safetensors``."""
        return self.metric_names

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

    def training_step(self, config: Dict, classes: List[str]) -> Step:
        """The loss of a training batch (:data:`Step`) under ``config``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, ctx, autocast: Callable, config: Dict) -> Evaluation:
        """Evaluate ``model`` on every batch of ``loader``, summed over the processes of ``ctx``."""
        raise NotImplementedError

    def describe(self, evaluation: Evaluation) -> str:
        """The metrics part of the per-epoch line."""
        return ', '.join(f'{k} {v:.2f}' for k, v in evaluation.metrics.items())

    def reports(self, folder: str, rows: List[Dict], evaluation: Evaluation, classes: List[str]) -> List[str]:
        """Write the figures of a finished run; return lines naming them."""
        return []


def registered(table: Mapping[str, T], name: str, kind: str) -> T:
    """``table[name]`` of a name -> builder table, or a ``ValueError`` naming the ``kind`` and the known names."""
    if name not in table:
        raise ValueError(f'unknown {kind} {name!r}; expected one of {", ".join(table)}')
    return table[name]
