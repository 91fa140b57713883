"""What the shared training loop (:mod:`deformvit.training`) needs to know about a task.

One loop trains every task on one device or many: recipes and overrides, DDP, AMP,
gradient accumulation and clipping, EMA, atomic checkpoints with exact resume, progress
bars, CSV/TensorBoard logs. A :class:`Task` supplies the rest: its recipe fields and flags,
data, model, the loss of a batch, the evaluation and the figures of a finished run.

A task keeps no state: every method computes its answer from the resolved config (and the
classes of the data) it is given, so the methods may be called in any order, and as often as
wanted.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

from ..errors import UsageError, closest

__all__ = ['Evaluation', 'Limit', 'Step', 'Task', 'registered']

T = TypeVar('T')

# The loss of one training batch: ``step(model, inputs, targets, device) -> (loss, images)``, run
# under autocast; a None loss skips the batch.
Step = Callable[[nn.Module, Any, Any, torch.device], Tuple[Optional[torch.Tensor], int]]


@dataclass(frozen=True)
class Limit:
    """What a config field takes, checked before a run starts (:meth:`check`).

    Attributes:
        low, high: the bounds of a number (None: unbounded); ``open_low`` / ``open_high`` exclude them.
        integer: whole numbers only.
        choices: the values allowed, instead of a number.
        optional: None (``null`` in YAML) is allowed too.
        count: a list of values is expected, of this length (0: any length but empty).
        or_list: one value, or a non-empty list of them (``min_size`` drawn per image).
    """
    low: Optional[float] = None
    high: Optional[float] = None
    integer: bool = False
    open_low: bool = False
    open_high: bool = False
    choices: Tuple[str, ...] = ()
    optional: bool = False
    count: Optional[int] = None
    or_list: bool = False

    def _expected_one(self) -> str:
        if self.choices:
            return 'one of ' + ', '.join(self.choices)
        if self.integer and self.low == 1 and self.high is None:
            return 'a positive integer'
        if self.low == 0 and self.open_low and self.high is None:
            return 'a positive number'
        kind = 'an integer' if self.integer else 'a number'
        if self.low is not None and self.high is not None:
            left, right = '(' if self.open_low else '[', ')' if self.open_high else ']'
            return f'{kind} in {left}{self.low:g}, {self.high:g}{right}'
        if self.low is not None:
            return f'{kind} {">" if self.open_low else ">="} {self.low:g}'
        if self.high is not None:
            return f'{kind} {"<" if self.open_high else "<="} {self.high:g}'
        return kind

    def expected(self) -> str:
        """What the field takes, in words (``'a positive integer'``, ``'a list of 2 numbers in (0, 1]'``)."""
        one = self._expected_one()
        if self.count is not None:
            words = one.replace('a positive integer', 'positive integers').replace('a number', 'numbers') \
                .replace('an integer', 'integers').replace('a positive number', 'positive numbers')
            one = f'a list of {self.count or "one or more"} {words}'
        if self.or_list:
            one += ' or a list of them'
        return one + (' or null' if self.optional else '')

    def _accepts_one(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`~deformvit.errors.UsageError` when ``value`` is not what field ``name`` takes."""
        if value is None and self.optional:
            return
        if self.or_list and isinstance(value, (list, tuple)):
            ok = len(value) > 0 and all(self._accepts_one(v) for v in value)
        elif self.count is None:
            ok = self._accepts_one(value)
        else:
            ok = (isinstance(value, (list, tuple)) and len(value) == self.count if self.count
                  else isinstance(value, (list, tuple)) and len(value) > 0)
            ok = ok and all(self._accepts_one(v) for v in value)
        if not ok:
            hint = closest(value, self.choices) if self.choices and isinstance(value, str) else ''
            raise UsageError(f'{name} must be {self.expected()}, got {value!r}{hint}')


POSITIVE_INT = Limit(1, integer=True)
PROBABILITY = Limit(0, 1)


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
        limits: what the task's numeric and choice fields take (:class:`Limit`), checked with the
            common fields' before a run starts.
    """
    name: str = ''
    command: str = ''
    defaults: Dict = {}
    flags: Tuple[str, ...] = ()
    model_field: str = 'model'
    find_unused_parameters: bool = False
    recipes: Tuple[str, str] = ('', '')
    metric_names: Tuple[str, ...] = ()
    limits: Dict[str, Limit] = {}

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

    def check_config(self, config: Dict) -> None:
        """Raise :class:`~deformvit.errors.UsageError` for a task field of ``config`` outside its :attr:`limits`."""
        for name, limit in self.limits.items():
            if name in config:
                limit.check(name, config[name])

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
    """``table[name]`` of a name -> builder table, or a :class:`~deformvit.errors.UsageError` (a ``ValueError``)
    naming the ``kind`` and the known names."""
    if name not in table:
        raise UsageError(f'unknown {kind} {name!r}; expected one of {", ".join(table)}'
                         + (closest(name, table) if isinstance(name, str) else ''))
    return table[name]
