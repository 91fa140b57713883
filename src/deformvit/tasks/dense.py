"""What detection and segmentation share around their models: their task's flags, the embedded
scenes as default data, class colours and the prediction of image folders."""
import json
import os
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from ..checkpoint import check_output_folder
from ..data import image_files
from ..data.common import first_few
from ..data.images import try_decode_rgb
from ..errors import UsageError, optional
from .base import Task, registered

__all__ = ['DenseTask', 'class_colors', 'output_names', 'predict_images', 'scenes_root']


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

    def check_config(self, config: Dict) -> None:
        registered(self.frameworks, config[self.framework_field], self.framework_field)
        super().check_config(config)


def scenes_root(data: Optional[str], layout: str) -> str:
    """``data``, or the embedded digit scenes in ``layout`` (``'coco'`` or ``'ade'``) when it is None."""
    if data is not None:
        return data
    from ..data.scenes import default_scenes_root, write_digit_scenes
    return write_digit_scenes(default_scenes_root())[layout]


def class_colors(num_classes: int) -> List[Tuple[int, int, int]]:
    """One RGB colour (0-255) per class index, from matplotlib's ``tab20`` (repeating after 20)."""
    cmap = optional('matplotlib', 'Drawing predictions').colormaps['tab20']
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]


def output_names(files: Sequence[str], inputs: Sequence[str], suffixes: Sequence[str]) -> List[List[str]]:
    """The files that prediction writes for each of ``files``, relative to the output folder.

    The outputs of an image mirror its path relative to the inputs' common folder: a single folder
    given, the paths below it (sub-folders kept, ``photos/a/x.jpg`` -> ``a/x<suffix>``); a single
    file, its name; several inputs, the paths below the folder that holds them all
    (``a/x.jpg b/x.jpg`` -> ``a/x<suffix>``, ``b/x<suffix>``). The image's extension gives way to
    each of ``suffixes`` (``x.jpg`` -> ``x.png``, ``x_overlay.png``), unless two images would then
    write the same file (``x.jpg`` and ``x.png`` in one folder, or ``x.png`` and ``x_overlay.jpg``
    beside an overlay): those keep their extension (``x.jpg.png``, ``x.png.png``). Should names still
    meet (files given without an extension), the later image, in the order of ``files``, takes a
    number (``x~2.png``). The names depend only on the paths, so a rerun writes the same files.

    Args:
        files: the image files, as :func:`~deformvit.data.image_files` lists them for ``inputs``.
        inputs: the files and folders given.
        suffixes: the endings of the files written per image, e.g. ``('.png', '_overlay.png')``.

    Returns:
        Per image of ``files``, one relative path per suffix, in the order of ``suffixes``.
    """
    if len(inputs) == 1:
        base = inputs[0] if os.path.isdir(inputs[0]) else os.path.dirname(inputs[0])
    else:
        base = os.path.commonpath([os.path.dirname(os.path.abspath(item)) for item in inputs])
    relative = [os.path.relpath(os.path.abspath(path), os.path.abspath(base)) for path in files]
    stems = [os.path.splitext(name)[0] for name in relative]
    while True:  # each pass gives at least one more image its extension back, so it ends
        writers = defaultdict(set)
        for index, stem in enumerate(stems):
            for suffix in suffixes:
                writers[stem + suffix].add(index)
        clashing = {index for indices in writers.values() if len(indices) > 1 for index in indices
                    if stems[index] != relative[index]}
        if not clashing:
            break
        for index in clashing:
            stems[index] = relative[index]
    names, taken = [], set()
    for stem in stems:
        candidate, number = stem, 1
        while any(candidate + suffix in taken for suffix in suffixes):
            number += 1
            candidate = f'{stem}~{number}'
        taken.update(candidate + suffix for suffix in suffixes)
        names.append([candidate + suffix for suffix in suffixes])
    return names


def _refuse_output_among_inputs(inputs: Sequence[str], output: str) -> None:
    """Raise UsageError when ``output`` is a folder given in ``inputs`` or below one, or the folder of a file given."""
    output_path = os.path.realpath(output)
    for item in inputs:
        if os.path.isdir(item):
            folder = os.path.realpath(item)
            if os.path.commonpath([output_path, folder]) == folder:
                where = 'the input folder' if output_path == folder else 'inside the input folder'
                raise UsageError(
                    f'output folder {output} is {where} {item}; its results would mix with the images and be read '
                    f'as inputs by the next run on {item}; choose an output folder outside the inputs')
        elif output_path == os.path.realpath(os.path.dirname(item) or '.'):
            raise UsageError(f'output folder {output} holds the input {item}; its results would mix with the '
                             f'images; choose an output folder outside the inputs')


def predict_images(inputs: Sequence[str], output: str, predict: Callable[[Image.Image, List[str]], Dict],
                   suffixes: Sequence[str], summary_file: str, summary: Dict[str, Any],
                   unusable: Optional[Callable[[Image.Image], Optional[str]]] = None) -> Dict:
    """Run ``predict(image, files)`` on every image of ``inputs`` and write ``summary_file``.

    Before anything is read or created, the inputs are listed (each file once) and refused when
    ``output`` is one of the folders given or inside one, or the folder of a file given, or when an
    output would replace an input file. Each image's outputs are named by :func:`output_names`.

    An image that cannot be read (see :func:`~deformvit.data.images.try_decode_rgb`: not an image,
    truncated, a header claiming too many pixels) or that ``unusable`` turns down is skipped with its
    reason, and the others are still predicted. ``summary_file`` (in ``output``) is written once every
    image is done, whatever was skipped: ``summary`` plus ``images`` (per image ``file``, the input
    path as listed; ``outputs``, the files written, relative to ``output``; then the record of
    ``predict``) and ``skipped`` (per image ``file`` and ``reason``); a run stopped by an error or an
    interruption writes it too, with the images done so far.

    Args:
        inputs: image files or folders (searched recursively).
        output: the folder written; created when the checks pass.
        predict: writes ``files`` (full paths, one per suffix; their folder exists) for one RGB image
            and returns the image's record.
        suffixes: the endings of the files written per image (:func:`output_names`).
        summary_file: name of the JSON summary in ``output``.
        summary: what the summary holds besides the images.
        unusable: why an RGB image cannot be predicted (a one-line reason), or None when it can.

    Returns:
        ``{'images': records, 'skipped': [{'file', 'reason'}]}``.

    Raises:
        FileNotFoundError: an input is neither a file nor a folder.
        DatasetError: the inputs hold no image files.
        UsageError: ``output`` is among the inputs, or is a file.
    """
    files = image_files(inputs)
    check_output_folder(output, 'output folder')
    _refuse_output_among_inputs(inputs, output)
    names = output_names(files, inputs, suffixes)
    input_paths = {os.path.realpath(path) for path in files}
    replaced = [os.path.join(output, name) for outputs in names for name in outputs
                if os.path.realpath(os.path.join(output, name)) in input_paths]
    if replaced:
        raise UsageError(f'the results would replace the input image(s) {first_few(replaced)}; choose an output '
                         f'folder outside the inputs')
    os.makedirs(output, exist_ok=True)
    records, skipped = [], []
    try:
        for path, outputs in zip(files, names):
            image, reason = try_decode_rgb(path)
            if image is not None and unusable is not None:
                reason = unusable(image)
            if reason is not None:
                skipped.append(dict(file=path, reason=reason))
                continue
            targets = [os.path.join(output, name) for name in outputs]
            os.makedirs(os.path.dirname(targets[0]), exist_ok=True)
            records.append(dict(file=path, outputs=outputs, **predict(image, targets)))
    finally:  # an interrupted or failed run still lists what it wrote
        with open(os.path.join(output, summary_file), 'w') as f:
            json.dump(dict(summary, images=records, skipped=skipped), f, indent=1)
    return dict(images=records, skipped=skipped)
