"""What detection and segmentation share around their models: their task's flags, the embedded
scenes as default data, class colours and the prediction of image folders."""
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from ..data import iter_images
from .base import Task

__all__ = ['DenseTask', 'class_colors', 'predict_images', 'scenes_root']


class DenseTask(Task):
    """A task whose model is a framework (named by the field ``framework_field``, one of ``frameworks``)
    on a ``backbone``; its data default to the embedded digit scenes.

    Attributes:
        framework_field: the recipe field and flag naming the framework (``detector``, ``decoder``).
        frameworks: the name -> framework table the field chooses from.
        data_help: what ``--data`` takes.
    """
    model_field = 'backbone'
    framework_field: str = ''
    frameworks: Mapping = {}
    data_help: str = ''

    def add_arguments(self, parser) -> None:
        parser.add_argument('--data', help=f'{self.data_help}; default: the embedded digit scenes')
        parser.add_argument('--backbone', help='registered model: dat_tiny, eapt_small, ... or a timm model')
        parser.add_argument(f'--{self.framework_field}', choices=self.frameworks)

    def run_name(self, config: Dict) -> str:
        return f"{config[self.framework_field]}-{config['backbone']}"


def scenes_root(data: Optional[str], layout: str) -> str:
    """``data``, or the embedded digit scenes in ``layout`` (``'coco'`` or ``'ade'``) when it is None."""
    if data is not None:
        return data
    from ..data.scenes import default_scenes_root, write_digit_scenes
    return write_digit_scenes(default_scenes_root())[layout]


def class_colors(num_classes: int) -> List[Tuple[int, int, int]]:
    """One RGB colour (0-255) per class index, from matplotlib's ``tab20`` (repeating after 20)."""
    import matplotlib
    cmap = matplotlib.colormaps['tab20']
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]


def predict_images(inputs: Sequence[str], output: str, predict: Callable[[str, Image.Image, str], Dict],
                   summary_file: str, summary: Dict[str, Any]) -> Dict:
    """Run ``predict(path, image, stem)`` on every image of ``inputs`` and write ``summary_file``.

    ``predict`` writes its outputs for one RGB image into ``output`` (named after ``stem``, the
    file name without extension) and returns the image's record. Unreadable files are skipped and
    listed. ``summary_file`` (in ``output``) holds ``summary`` plus ``images`` (the records) and
    ``unreadable``.

    Returns:
        ``{'images': records, 'unreadable': paths}``.
    """
    os.makedirs(output, exist_ok=True)
    records, unreadable = [], []
    for path, image in iter_images(inputs):
        if image is None:
            unreadable.append(path)
            continue
        records.append(predict(path, image, os.path.splitext(os.path.basename(path))[0]))
    with open(os.path.join(output, summary_file), 'w') as f:
        json.dump(dict(summary, images=records, unreadable=unreadable), f, indent=1)
    return dict(images=records, unreadable=unreadable)
