"""Training every task: the config and its recipes, the shared loop, resumable state and reports.

``deformvit train`` (classification), ``deformvit detect train`` and ``deformvit segment
train`` resolve a config (:func:`resolve_config`) and call :func:`run`.
"""
from .config import COMMON_DEFAULTS, check_config, defaults, load_recipe, recipe_names, resolve_config
from .loop import TrainingDiverged, run

__all__ = ['COMMON_DEFAULTS', 'TrainingDiverged', 'check_config', 'defaults', 'load_recipe', 'recipe_names',
           'resolve_config', 'run']
