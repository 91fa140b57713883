"""COCO-format detection and instance-segmentation data for torchvision detection models.

``CocoDetection`` reads an images folder with its ``instances_<split>.json`` and checks the
JSON against itself and the folder in the constructor, so a wrong path, a broken file or
annotations that point nowhere fail before training starts. Samples come in the form that
torchvision's detection models take: a float image in [0, 1], CHW, and a target dict with
``xyxy`` boxes and labels ``1..K`` (0 is the background). Files that turn out unreadable at
load time come back as ``None``; ``collate_detection`` drops them from the batch and counts
them, like ``collate_skipping_corrupt`` does for classification.

With ``semantic_dir`` the targets also hold a semantic map per image, for detectors with a
semantic branch (Hybrid Task Cascade): single-channel PNGs of class indices as COCO-stuff's
``stuffthingmaps`` hold them, which ``coco_semantic_dir`` finds next to a COCO root. With
``crop`` training samples get the resize-then-crop augmentation of Swin Transformer's 3x COCO
recipe (mmdetection's AutoAugment policy), before the model's own multi-scale resize.

``to_coco_results`` turns a model's predictions back into COCO result entries and
``coco_evaluate`` scores them with pycocotools' ``COCOeval``, returning AP in percent.
"""
import contextlib
import io
import json
import math
import numbers
import os
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import optional
from .common import (DatasetError, collate_readable, first_few, keep_ratio_size, path_problem, random_int,
                     refuse)
from .images import decode_rgb

if TYPE_CHECKING:  # an optional package (the detection extra), imported where it is used
    from pycocotools.coco import COCO

__all__ = ['COCO_SPLIT_NAMES', 'CocoDetection', 'coco_evaluate', 'coco_layout', 'coco_semantic_dir',
           'collate_detection', 'to_coco_results']


def _pycocotools(module: str, purpose: str):
    """``pycocotools.<module>``, an optional package (the ``detection`` extra)."""
    return optional(f'pycocotools.{module}', purpose)


COCO_SPLIT_NAMES = {'train': ('train2017', 'train'), 'val': ('val2017', 'val')}
MIN_BOX_SIDE = 1.0  # boxes narrower or lower than this many pixels after clipping are dropped
STUFF_FOLDER = 'stuffthingmaps'  # folder of a COCO root holding the semantic maps, one sub-folder per split

_REQUIRED_FIELDS = {
    'images': ('image', ('id', 'file_name', 'width', 'height')),
    'annotations': ('annotation', ('id', 'image_id', 'category_id', 'bbox')),
    'categories': ('category', ('id', 'name')),
}
_SKIP_DESCRIPTIONS = {
    'no_annotations': 'images without usable annotations',
    'crowd': 'crowd annotations',
    'invalid_boxes': f'boxes under {MIN_BOX_SIDE:g} px after clipping',
    'no_segmentation': 'annotations without segmentation',
}
_METRIC_PREFIXES = {'bbox': 'box', 'segm': 'mask'}
_RESULT_KEYS = {'bbox': 'bbox', 'segm': 'segmentation'}
_SUMMARY_METRICS = ('ap', 'ap50', 'ap75', 'aps', 'apm', 'apl')  # the first six COCOeval.stats


def _quietly():
    """Context that swallows pycocotools' progress prints."""
    return contextlib.redirect_stdout(io.StringIO())


def coco_layout(root: str, splits: Sequence[str] = ('train', 'val')) -> Dict[str, Tuple[str, str]]:
    """Find the ``splits`` of a COCO-style dataset root: both to train, only ``('val',)`` to evaluate.

    A split named ``<name>`` exists when ``root/<name>/`` is a folder of images and
    ``root/annotations/instances_<name>.json`` is a file; the names tried are those of
    ``COCO_SPLIT_NAMES``, in order (``train2017`` before ``train``, ``val2017`` before ``val``).
    Splits not asked for are neither looked for nor required.

    Args:
        root: the dataset root.
        splits: the splits needed, keys of ``COCO_SPLIT_NAMES``.

    Returns:
        ``{split: (images_dir, annotation_file)}`` for each of ``splits``.

    Raises:
        ValueError: a split that is not a key of ``COCO_SPLIT_NAMES``.
        DatasetError: a split was not found; the message lists every path looked for.
    """
    root = os.fspath(root)
    unknown = [split for split in splits if split not in COCO_SPLIT_NAMES]
    if unknown or not splits:
        raise ValueError(f'splits {tuple(splits)!r} are not COCO splits; expected one or more of '
                         f'{", ".join(map(repr, COCO_SPLIT_NAMES))}')
    layout = {}
    not_found = []
    for split in splits:
        for name in COCO_SPLIT_NAMES[split]:
            images_dir = os.path.join(root, name)
            annotation_file = os.path.join(root, 'annotations', f'instances_{name}.json')
            if os.path.isdir(images_dir) and os.path.isfile(annotation_file):
                layout[split] = (images_dir, annotation_file)
                break
        else:
            tried = ' or '.join(f'{name}/ with annotations/instances_{name}.json' for name in COCO_SPLIT_NAMES[split])
            not_found.append(f'{split} (looked for {tried})')
    if not_found:
        raise DatasetError(
            f'COCO root {root!r} lacks the split(s) {"; ".join(not_found)}; expected the COCO layout '
            f'root/<split>/<images> and root/annotations/instances_<split>.json; check the path or '
            f'rename the folders')
    return layout


def coco_semantic_dir(root: str, split: str) -> Optional[str]:
    """The folder of a split's semantic maps in a COCO root, as COCO-stuff lays them out, if there is one.

    The maps of a split whose images are in ``root/<name>/`` (the folder ``coco_layout`` picks,
    e.g. ``train2017`` or ``train``) are looked for in ``root/stuffthingmaps/<name>/``, where
    COCO-stuff's ``stuffthingmaps_trainval2017`` archive puts them once extracted and renamed.

    Args:
        root: the dataset root.
        split: a key of ``COCO_SPLIT_NAMES``.

    Returns:
        ``root/stuffthingmaps/<name>`` when it is a folder, else None.

    Raises:
        ValueError: ``split`` is not a key of ``COCO_SPLIT_NAMES``.
        DatasetError: the root lacks the split itself (see ``coco_layout``).
    """
    images_dir, _ = coco_layout(root, (split,))[split]
    semantic_dir = os.path.join(os.fspath(root), STUFF_FOLDER, os.path.basename(images_dir))
    return semantic_dir if os.path.isdir(semantic_dir) else None


def _read_annotation_json(path: str) -> Dict[str, Any]:
    """The parsed JSON of ``path``, checked to hold the lists ``images``, ``annotations``, ``categories``."""
    try:
        with open(path, encoding='utf-8') as file:
            dataset = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(
            f'annotation file {path!r} is not valid JSON ({error}); expected a COCO instances '
            f'file; check that it is the right file and was written in full') from error
    found = sorted(dataset) if isinstance(dataset, dict) else []
    missing = [key for key in _REQUIRED_FIELDS if not (found and isinstance(dataset.get(key), list))]
    if missing:
        raise DatasetError(
            f'annotation file {path!r} lacks the top-level list(s) {", ".join(map(repr, missing))} '
            f'(found keys: {", ".join(map(repr, found)) or "none"}); expected a COCO instances file '
            f'with the lists images, annotations and categories')
    return dataset


def _is_box(bbox: Any) -> bool:
    """Whether ``bbox`` is four finite numbers ``[x, y, width, height]``: Python's JSON reader takes
    ``NaN`` and ``Infinity``, which would pass the clipping and end as a NaN loss."""
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    for value in bbox))


def _check_records(dataset: Dict[str, Any], path: str) -> None:
    """Raise on records without their required fields, with malformed boxes or duplicate ids."""
    malformed = []
    for key, (kind, fields) in _REQUIRED_FIELDS.items():
        for position, record in enumerate(dataset[key]):
            if not isinstance(record, dict):
                malformed.append(f'{kind} #{position} is not an object')
                continue
            absent = [field for field in fields if field not in record]
            if absent:
                malformed.append(f'{kind} #{position} lacks {", ".join(map(repr, absent))}')
            elif kind == 'annotation' and not _is_box(record['bbox']):
                malformed.append(f'annotation {record["id"]} has bbox {record["bbox"]!r}')
            elif kind == 'image' and not all(isinstance(record[side], int) and record[side] > 0
                                             for side in ('width', 'height')):
                malformed.append(f'image {record["id"]} has size {record["width"]!r}x{record["height"]!r}')
    refuse(malformed, f'malformed record(s) in {path!r}',
           'expected images with id, file_name and positive integer width and height, annotations with id, '
           'image_id, category_id and bbox [x, y, width, height] of four finite numbers (no NaN or Infinity), '
           'categories with id and name; fix or remove them')
    for key, (kind, _) in _REQUIRED_FIELDS.items():
        counts = Counter(record['id'] for record in dataset[key])
        refuse([f'{record_id} ({count} times)' for record_id, count in counts.items() if count > 1],
               f'duplicate {kind} id(s) in {path!r}',
               f'expected every {kind} id once; merge or renumber the duplicates')


def _check_references(dataset: Dict[str, Any], path: str) -> None:
    """Raise on annotations of unknown images or categories, or with an RLE sized for another image."""
    images = {image['id']: image for image in dataset['images']}
    category_ids = sorted(category['id'] for category in dataset['categories'])
    known_categories = set(category_ids)
    refuse([f'annotation {ann["id"]} -> image_id {ann["image_id"]!r}'
            for ann in dataset['annotations'] if ann['image_id'] not in images],
           f'annotation(s) in {path!r} refer to images that are not in "images"',
           'expected every image_id to be the id of an image; remove those annotations or add their images')
    refuse([f'annotation {ann["id"]} -> category_id {ann["category_id"]!r}'
            for ann in dataset['annotations'] if ann['category_id'] not in known_categories],
           f'annotation(s) in {path!r} have labels outside the class range',
           f'expected category ids among the categories ({first_few(category_ids)}); remove those '
           'annotations or add their categories')
    mis_sized = []
    for ann in dataset['annotations']:
        segmentation = ann.get('segmentation')
        image = images[ann['image_id']]
        if isinstance(segmentation, dict) and list(segmentation.get('size', ())) != [image['height'], image['width']]:
            mis_sized.append(f'annotation {ann["id"]} has RLE size {segmentation.get("size")!r} on image '
                             f'{image["id"]} of height x width [{image["height"]}, {image["width"]}]')
    refuse(mis_sized, f'RLE segmentation(s) in {path!r} do not match their image',
           'expected RLE size [height, width] of the image; regenerate the annotations for these images')


def _clip_box(bbox: Sequence[float], width: int, height: int) -> Tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` clipped to a ``width`` x ``height`` image."""
    x, y, box_width, box_height = bbox
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + box_width, 0.0), width), min(max(y + box_height, 0.0), height))


def _semantic_name(file_name: str) -> str:
    """The semantic map's path relative to ``semantic_dir``: ``file_name`` with the extension ``.png``."""
    return os.path.splitext(file_name)[0] + '.png'


def _read_semantic(path: str) -> Optional[np.ndarray]:
    """The class indices of the semantic map PNG at ``path``, (H, W); None when it cannot be decoded.

    A palette (mode ``P``) image gives its palette indices, not the colours they stand for.

    Raises:
        DatasetError: the file decodes to more than one channel (an RGB rendering, an alpha channel).
    """
    try:
        with Image.open(path) as file:
            file.load()  # decodes every byte: truncated files raise here
            mode = file.mode
            indices = np.array(file)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return None
    if indices.ndim != 2:
        raise DatasetError(
            f'semantic map {path!r} is a mode {mode} image of shape {indices.shape}; expected a single-channel '
            f'PNG of class indices (mode L, P or I;16, 255 unlabelled), not a colour rendering; convert it to '
            f'class indices')
    return indices


def _is_positive_int(value: Any) -> bool:
    """Whether ``value`` is a whole number above zero (an int or numpy integer, not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _checked_crop(crop: float, crop_sizes: Sequence[int], crop_range: Tuple[int, int],
                  crop_max_size: int) -> Tuple[Tuple[int, ...], Tuple[int, int]]:
    """``(crop_sizes, crop_range)`` as tuples of ints, after checking every crop argument of ``CocoDetection``."""
    if not 0.0 <= crop <= 1.0:
        raise ValueError(f'crop {crop} is outside [0, 1]; expected the probability of the resize-then-crop '
                         f'augmentation, e.g. 0.5 as in Swin Transformer\'s 3x COCO recipe, or 0 for none')
    crop_sizes = tuple(crop_sizes)
    if not crop_sizes or not all(_is_positive_int(size) for size in crop_sizes):
        raise ValueError(f'crop_sizes {crop_sizes!r} is not a non-empty list of positive integers; expected the '
                         f'short sides of the resize before the crop, e.g. (400, 500, 600)')
    crop_range = tuple(crop_range)
    if len(crop_range) != 2 or not all(_is_positive_int(side) for side in crop_range) or crop_range[0] > crop_range[1]:
        raise ValueError(f'crop_range {crop_range!r} is not two positive integers (smallest, largest); expected '
                         f'the range of the crop\'s height and width, e.g. (384, 600)')
    if not _is_positive_int(crop_max_size):
        raise ValueError(f'crop_max_size {crop_max_size!r} is not a positive integer; expected the longest side '
                         f'of the resize before the crop, e.g. 1333')
    return tuple(int(size) for size in crop_sizes), (int(crop_range[0]), int(crop_range[1]))


def _describe_skips(skipped: Dict[str, int]) -> str:
    """``'3 crowd annotations, 1 boxes under 1 px after clipping'``, or ``'nothing'``."""
    return ', '.join(f'{count} {_SKIP_DESCRIPTIONS[key]}' for key, count in skipped.items() if count) or 'nothing'


class _ImageRecord(NamedTuple):
    """One image's file and its usable annotations, as numpy arrays ready for a target."""
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy, clipped to the image
    labels: np.ndarray  # (N,) int64 in 1..K
    areas: np.ndarray  # (N,) float32, the annotation's 'area' (segment area in COCO)
    annotations: List[Dict[str, Any]]  # the N annotations, for decoding their masks


class CocoDetection(Dataset):
    """Images and instance annotations of a COCO instances file, for torchvision detection models.

    The constructor validates the JSON and the images folder (see Raises) and builds every
    image's targets: crowd annotations (``iscrowd=1``) are not targets; boxes are converted
    from COCO ``[x, y, w, h]`` to ``[x1, y1, x2, y2]`` and clipped to the image, and those whose
    clipped width or height is under ``MIN_BOX_SIDE`` pixels are dropped; with ``with_masks``,
    annotations without a segmentation are dropped as well. ``skipped`` counts all of these
    over the whole file.

    Categories sorted by COCO id give the contiguous labels: label ``i + 1`` is
    ``classes[i]``, COCO id ``category_ids[i]``; label 0 is the background.

    ``__getitem__`` returns ``(image, target)``: ``image`` a float32 RGB tensor ``(3, H, W)`` in
    [0, 1]; ``target`` a dict with ``boxes`` float32 ``(N, 4)`` xyxy in pixels, ``labels`` int64
    ``(N,)`` in ``1..K``, ``image_id`` (int), ``area`` float32 ``(N,)``, ``iscrowd`` int64 ``(N,)``
    (all zero), with ``with_masks`` ``masks`` uint8 ``(N, H, W)`` decoded from polygons or RLE,
    and with ``semantic_dir`` ``semantic`` int64 ``(H, W)``: the class indices of the image's
    semantic map, 255 where unlabelled. It returns ``None`` when the image file or its semantic
    map cannot be decoded; use ``collate_detection`` as the DataLoader's ``collate_fn``.

    In training, with probability ``crop``, the sample is first resized, aspect kept, to a short
    side drawn from ``crop_sizes`` with the long side at most ``crop_max_size``, then cropped to
    a height and a width each drawn from ``crop_range`` (at most the resized side) at a random
    position: the 3x multi-scale-with-crop recipe of Swin Transformer and DAT on COCO. Boxes are
    scaled, shifted and clipped to the crop, and dropped with their labels, areas and masks when
    under ``MIN_BOX_SIDE`` pixels wide or high; a kept box's ``area`` is scaled by the resize
    and by the fraction of the box inside the crop. A crop may keep no box (mmdetection's
    ``allow_negative_crop``). The image is resized bilinearly, masks and semantic maps with
    nearest neighbour. Then the image, boxes, masks and semantic map are flipped left-right
    together with probability ``hflip``. All draws use torch's global RNG; with ``crop=0`` no
    crop draw is made.

    Args:
        images_dir: folder holding the images; ``file_name`` in the JSON is relative to it.
        annotation_file: COCO instances JSON (``instances_<split>.json``).
        train: draw random crops and horizontal flips, and by default skip images without targets.
        with_masks: add the instance masks to the targets (Mask R-CNN).
        hflip: probability of a horizontal flip per training sample, in [0, 1].
        skip_empty: leave out images without any usable annotation. Default: ``train``
            (training skips them; evaluation keeps them, as COCO scores every image).
        semantic_dir: folder of single-channel PNG semantic maps (class indices, 255 unlabelled),
            one per image at ``file_name`` with the extension ``.png``, sub-folders kept: COCO-stuff's
            ``stuffthingmaps/<split>`` (see ``coco_semantic_dir``). None: no ``semantic`` in the targets.
        crop: probability of the resize-then-crop augmentation per training sample, in [0, 1].
        crop_sizes: short sides of the resize before the crop, one drawn uniformly per sample.
        crop_range: ``(smallest, largest)`` height and width of the crop, each drawn uniformly
            (inclusive) and clipped to the resized image.
        crop_max_size: longest side of the resize before the crop.

    Attributes:
        classes: category names, label ``i + 1`` <-> ``classes[i]``.
        category_ids: COCO category id of each contiguous index.
        coco: pycocotools ``COCO`` index of the whole file, the ground truth for ``coco_evaluate``.
        ids: ids of the images in the dataset, sorted; sample ``i`` is image ``ids[i]``.
        skipped: counts of ``no_annotations`` (images), ``crowd``, ``invalid_boxes`` and
            ``no_segmentation`` (annotations).

    Raises:
        ValueError: ``hflip`` or ``crop`` outside [0, 1]; ``crop_sizes`` empty or not positive
            integers; ``crop_range`` not two positive integers, smallest first; ``crop_max_size``
            not a positive integer.
        DatasetError: the folder or file is missing; the file is not JSON or lacks images,
            annotations or categories; records lack required fields, repeat an id or have a
            bbox that is not four finite numbers (NaN, Infinity); annotations refer to unknown
            images or categories; image files named in the JSON are not in ``images_dir``; no
            image is left; ``semantic_dir`` is missing or lacks the map of a kept image.
            ``__getitem__`` raises it when an image's decoded size differs from the width and
            height in the JSON, or its semantic map has another size or more than one channel.
    """

    def __init__(self, images_dir: str, annotation_file: str, train: bool = False,
                 with_masks: bool = False, hflip: float = 0.5, skip_empty: Optional[bool] = None,
                 semantic_dir: Optional[str] = None, crop: float = 0.0,
                 crop_sizes: Sequence[int] = (400, 500, 600), crop_range: Tuple[int, int] = (384, 600),
                 crop_max_size: int = 1333):
        images_dir = os.fspath(images_dir)
        annotation_file = os.fspath(annotation_file)
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f'hflip {hflip} is outside [0, 1]; expected a flip probability, e.g. 0.5')
        crop_sizes, crop_range = _checked_crop(crop, crop_sizes, crop_range, crop_max_size)
        for path, folder, expected in (
                (images_dir, True, f'the folder of the images named in {annotation_file!r}'),
                (annotation_file, False, 'a COCO instances JSON such as annotations/instances_val2017.json')):
            problem = path_problem(path, folder)
            if problem:
                raise DatasetError(f'{"images folder" if folder else "annotation file"} {path!r} {problem}; '
                                   f'expected {expected}; check the path')
        if semantic_dir is not None:
            semantic_dir = os.fspath(semantic_dir)
            problem = path_problem(semantic_dir, True)
            if problem:
                raise DatasetError(
                    f'semantic map folder {semantic_dir!r} {problem}; expected a folder of single-channel '
                    f'PNG class-index maps named like the images, such as COCO-stuff\'s stuffthingmaps/train2017 '
                    f'(see coco_semantic_dir); check the path, or pass semantic_dir=None')
        dataset = _read_annotation_json(annotation_file)
        _check_records(dataset, annotation_file)
        _check_references(dataset, annotation_file)
        refuse([image['file_name'] for image in dataset['images']
                if not os.path.isfile(os.path.join(images_dir, image['file_name']))],
               f'of the {len(dataset["images"])} image files named in {annotation_file!r} are not in {images_dir!r}',
               'expected images_dir to be the folder these annotations were made for')

        categories = sorted(dataset['categories'], key=lambda category: category['id'])
        label_of_category = {category['id']: index + 1 for index, category in enumerate(categories)}
        images = {image['id']: image for image in dataset['images']}
        skipped = dict.fromkeys(_SKIP_DESCRIPTIONS, 0)
        annotations_of_image = {image_id: [] for image_id in images}
        for ann in dataset['annotations']:
            ann.setdefault('iscrowd', 0)  # COCOeval reads both fields from the ground truth
            ann.setdefault('area', float(ann['bbox'][2] * ann['bbox'][3]))
            image = images[ann['image_id']]
            x1, y1, x2, y2 = _clip_box(ann['bbox'], image['width'], image['height'])
            if ann['iscrowd']:
                skipped['crowd'] += 1
            elif x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
                skipped['invalid_boxes'] += 1
            elif with_masks and not ann.get('segmentation'):
                skipped['no_segmentation'] += 1
            else:
                annotations_of_image[ann['image_id']].append((ann, (x1, y1, x2, y2)))

        skip_empty = train if skip_empty is None else skip_empty
        records = {}
        for image_id in sorted(images):
            usable = annotations_of_image[image_id]
            if skip_empty and not usable:
                skipped['no_annotations'] += 1
                continue
            image = images[image_id]
            records[image_id] = _ImageRecord(
                file_name=image['file_name'], width=image['width'], height=image['height'],
                boxes=np.array([box for _, box in usable], dtype=np.float32).reshape(-1, 4),
                labels=np.array([label_of_category[ann['category_id']] for ann, _ in usable], dtype=np.int64),
                areas=np.array([ann['area'] for ann, _ in usable], dtype=np.float32),
                annotations=[ann for ann, _ in usable])
        if not records:
            raise DatasetError(
                f'no images left in {annotation_file!r}: {len(images)} image(s), of which '
                f'{skipped["no_annotations"]} have no usable annotation (skipped: '
                f'{_describe_skips(skipped)}); expected at least one image with a non-crowd box '
                f'of at least {MIN_BOX_SIDE:g} px; check the file, or pass skip_empty=False')
        if semantic_dir is not None:
            refuse([_semantic_name(record.file_name) for record in records.values()
                    if not os.path.isfile(os.path.join(semantic_dir, _semantic_name(record.file_name)))],
                   f'of the {len(records)} images of {annotation_file!r} have no semantic map in {semantic_dir!r}',
                   'expected a PNG per image named like its file_name with the extension .png, sub-folders '
                   'kept (the COCO-stuff stuffthingmaps layout); use the maps made for these images')

        coco = _pycocotools('coco', 'Reading COCO annotations').COCO()
        coco.dataset = dataset
        with _quietly():
            coco.createIndex()

        self.images_dir = images_dir
        self.annotation_file = annotation_file
        self.coco = coco
        self.classes = [category['name'] for category in categories]
        self.category_ids = [category['id'] for category in categories]
        self.train = train
        self.with_masks = with_masks
        self.hflip = hflip
        self.semantic_dir = semantic_dir
        self.crop = crop
        self.crop_sizes = crop_sizes
        self.crop_range = crop_range
        self.crop_max_size = int(crop_max_size)
        self.ids = list(records)
        self.skipped = skipped
        self._records = records

    def summary(self) -> str:
        """One line: file, images, boxes, classes and what was skipped."""
        n_boxes = sum(len(record.labels) for record in self._records.values())
        return (f'{os.path.basename(self.annotation_file)}: {len(self)} images, {n_boxes} boxes, '
                f'{len(self.classes)} classes; skipped {_describe_skips(self.skipped)}')

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, Dict[str, Any]]]:
        image_id = self.ids[index]
        record = self._records[image_id]
        path = os.path.join(self.images_dir, record.file_name)
        pil_image = decode_rgb(path)
        if pil_image is None:
            return None
        if pil_image.size != (record.width, record.height):
            raise DatasetError(
                f'image {path!r} is {pil_image.width}x{pil_image.height} (width x height) but '
                f'{self.annotation_file!r} gives {record.width}x{record.height}; expected the JSON to '
                f'describe these very files, else its boxes land in the wrong place; use the images '
                f'the annotations were made for, or regenerate the annotations')
        semantic = None
        if self.semantic_dir is not None:
            semantic_path = os.path.join(self.semantic_dir, _semantic_name(record.file_name))
            semantic = _read_semantic(semantic_path)  # (H, W) class indices
            if semantic is None:
                return None
            if semantic.shape != (record.height, record.width):
                raise DatasetError(
                    f'semantic map {semantic_path!r} is {semantic.shape[1]}x{semantic.shape[0]} (width x height) '
                    f'but its image {path!r} is {record.width}x{record.height}; expected the map at the '
                    f'resolution of its image; use the maps made for these images')
        image = torch.from_numpy(np.array(pil_image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        image = image.float().div_(255.0)
        target = {
            'boxes': torch.tensor(record.boxes),
            'labels': torch.tensor(record.labels),
            'image_id': image_id,
            'area': torch.tensor(record.areas),
            'iscrowd': torch.zeros(len(record.labels), dtype=torch.int64),
        }
        if self.with_masks:
            masks = [self.coco.annToMask(ann) for ann in record.annotations]  # N x (H, W) uint8
            target['masks'] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, record.height, record.width), dtype=torch.uint8))
        if semantic is not None:
            target['semantic'] = torch.from_numpy(semantic.astype(np.int64))
        if self.train and self.crop > 0.0 and torch.rand(()).item() < self.crop:
            image, target = self._resize_and_crop(image, target)
        if self.train and torch.rand(()).item() < self.hflip:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = target['boxes']
            # pixels [x1, x2) of a width-W image land on [W - x2, W - x1)
            target['boxes'] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            for key in ('masks', 'semantic'):
                if key in target:
                    target[key] = target[key].flip(-1)
        return image, target

    def _resize_and_crop(self, image: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The resize-then-crop of Swin Transformer's 3x recipe, applied to an image and its target (see the class).

        Draws, in order: the short side, the crop's height, its width, its top, its left.
        """
        height, width = image.shape[-2:]
        short_side = self.crop_sizes[random_int(0, len(self.crop_sizes) - 1)]
        resized_height, resized_width = keep_ratio_size(height, width, (short_side, self.crop_max_size))
        smallest, largest = self.crop_range
        crop_height = random_int(min(smallest, resized_height), min(largest, resized_height))
        crop_width = random_int(min(smallest, resized_width), min(largest, resized_width))
        top = random_int(0, resized_height - crop_height)
        left = random_int(0, resized_width - crop_width)
        rows, columns = slice(top, top + crop_height), slice(left, left + crop_width)
        size = [resized_height, resized_width]

        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)[:, rows, columns]
        scale = torch.tensor([resized_width / width, resized_height / height] * 2, dtype=torch.float32)
        offset = torch.tensor([left, top] * 2, dtype=torch.float32)
        limit = torch.tensor([crop_width, crop_height] * 2, dtype=torch.float32)
        scaled = target['boxes'] * scale  # (N, 4) xyxy in the resized image
        boxes = torch.minimum((scaled - offset).clamp(min=0.0), limit)  # (N, 4) xyxy in the crop
        sides = boxes[:, 2:] - boxes[:, :2]  # (N, 2) width, height
        keep = (sides >= MIN_BOX_SIDE).all(dim=1)
        inside = sides.prod(dim=1) / (scaled[:, 2:] - scaled[:, :2]).prod(dim=1)  # fraction of each box kept
        cropped = dict(target, boxes=boxes[keep], labels=target['labels'][keep],
                       area=(target['area'] * scale[0] * scale[1] * inside)[keep], iscrowd=target['iscrowd'][keep])
        if 'masks' in target:
            masks = target['masks'][keep]  # (N', H, W)
            cropped['masks'] = (F.resize(masks, size, interpolation=InterpolationMode.NEAREST)[:, rows, columns]
                                if len(masks) else torch.zeros((0, crop_height, crop_width), dtype=torch.uint8))
        if 'semantic' in target:
            semantic = F.resize(target['semantic'][None], size, interpolation=InterpolationMode.NEAREST)[0]
            cropped['semantic'] = semantic[rows, columns]
        return image, cropped


def collate_detection(
        batch: Sequence[Optional[Tuple[torch.Tensor, Dict[str, Any]]]],
) -> Tuple[Optional[List[torch.Tensor]], Optional[List[Dict[str, Any]]], int]:
    """Collate ``(image, target)`` detection samples, dropping the ``None`` of unreadable files.

    Images differ in size, so they stay a list, as torchvision detection models take them.

    Args:
        batch: samples from ``CocoDetection``; ``None`` marks an unreadable file.

    Returns:
        ``(images, targets, skipped)``: the lists of images and targets of the readable samples
        and the number dropped; ``(None, None, skipped)`` when every sample was unreadable.
    """
    return collate_readable(batch, lambda kept: ([image for image, _ in kept], [target for _, target in kept]))


def to_coco_results(image_id: int, prediction: Dict[str, torch.Tensor], category_ids: Sequence[int],
                    mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """Turn one image's torchvision detection output into COCO result entries.

    Args:
        image_id: COCO id of the image the prediction is for.
        prediction: ``boxes`` ``(N, 4)`` xyxy in the image's pixels, ``labels`` ``(N,)`` in
            ``1..K``, ``scores`` ``(N,)`` and optionally ``masks`` ``(N, 1, H, W)`` probabilities.
        category_ids: COCO category id of each contiguous index (``CocoDetection.category_ids``).
        mask_threshold: mask probabilities above it are foreground.

    Returns:
        One dict per detection with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``
        and ``score`` as Python numbers, plus ``segmentation`` (compressed RLE with ``counts``
        as str, JSON-ready) when the prediction has masks.

    Raises:
        ValueError: a label outside ``1..len(category_ids)`` or masks not shaped ``(N, 1, H, W)``.
    """
    boxes = prediction['boxes'].detach().cpu().double()
    labels = prediction['labels'].detach().cpu().tolist()
    scores = prediction['scores'].detach().cpu().tolist()
    outside = [label for label in labels if not 1 <= label <= len(category_ids)]
    if outside:
        raise ValueError(f'prediction for image {image_id} has labels {first_few(outside)} outside '
                         f'1..{len(category_ids)}; expected torchvision labels (0 is background) for '
                         f'the {len(category_ids)} categories of category_ids')
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()  # (N, 4) xyxy -> xywh
    results = [{'image_id': int(image_id), 'category_id': int(category_ids[label - 1]), 'bbox': box,
                'score': score} for box, label, score in zip(xywh, labels, scores)]
    if 'masks' in prediction:
        masks = prediction['masks'].detach()
        if masks.dim() != 4 or masks.shape[1] != 1 or masks.shape[0] != len(results):
            raise ValueError(f'prediction masks for image {image_id} have shape {tuple(masks.shape)}; '
                             f'expected ({len(results)}, 1, H, W), one probability map per box')
        binary = (masks[:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # (N, H, W)
        encode = _pycocotools('mask', 'COCO mask results').encode
        rles = encode(np.asfortranarray(binary.transpose(1, 2, 0))) if results else []  # N RLEs
        for entry, rle in zip(results, rles):
            entry['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
    return results


def _load_results(coco_gt: 'COCO', results: Sequence[Dict[str, Any]], iou_type: str) -> 'COCO':
    """The results of one IoU type as a ``COCO`` index; copies, since pycocotools edits them."""
    kept_key = _RESULT_KEYS[iou_type]
    other_keys = set(_RESULT_KEYS.values()) - {kept_key}
    lacking = [index for index, entry in enumerate(results) if kept_key not in entry]
    if lacking:
        raise ValueError(f'{len(lacking)} result(s) lack {kept_key!r} (entries {first_few(lacking)}); '
                         f'expected it in every entry for {iou_type!r} evaluation; pass the model\'s masks '
                         f'to to_coco_results, or evaluate only what the results hold')
    # without the other key, loadRes computes 'area' from this one: the box or the mask area
    entries = [{key: value for key, value in entry.items() if key not in other_keys} for entry in results]
    with _quietly():
        if entries:
            return coco_gt.loadRes(entries)
        no_detections = _pycocotools('coco', 'COCO evaluation').COCO()
        no_detections.dataset = {'images': list(coco_gt.dataset['images']),
                                 'categories': list(coco_gt.dataset['categories']), 'annotations': []}
        no_detections.createIndex()
    return no_detections


def _percent(value: float) -> float:
    """A COCOeval value as a percentage; its -1 (no ground truth to score) becomes nan."""
    return 100.0 * float(value) if value >= 0 else math.nan


def coco_evaluate(coco_gt: 'COCO', results: Sequence[Dict[str, Any]], iou_types: Sequence[str] = ('bbox',),
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Score COCO result entries against the ground truth with pycocotools' ``COCOeval``.

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection.coco``.
        results: entries from ``to_coco_results``, for any of the evaluated images; empty
            results score 0 wherever there is ground truth.
        iou_types: ``'bbox'`` and / or ``'segm'`` (the latter needs ``segmentation`` in every entry).
        image_ids: the images to score, e.g. ``CocoDetection.ids`` when the dataset left images
            out; images without detections count as misses. Default: every ground-truth image.

    Returns:
        Percentages ``box_ap``, ``box_ap50``, ``box_ap75``, ``box_aps``, ``box_apm``, ``box_apl``
        for ``'bbox'`` and the same with ``mask_`` for ``'segm'``, plus ``box_ap_per_class`` /
        ``mask_ap_per_class``: AP per category in sorted COCO id order (the order of
        ``CocoDetection.classes``). A value is nan where there is no ground truth to score
        (a category absent from the images, no objects of that size).

    Raises:
        ValueError: an unknown IoU type; results or ``image_ids`` naming images not in
            ``coco_gt``; empty ``image_ids``; entries lacking the key an IoU type needs.
    """
    unknown = [iou_type for iou_type in iou_types if iou_type not in _METRIC_PREFIXES]
    if unknown:
        raise ValueError(f'unknown IoU type(s) {first_few(unknown)}; expected any of {", ".join(_METRIC_PREFIXES)}')
    gt_image_ids = set(coco_gt.getImgIds())
    foreign = sorted({entry['image_id'] for entry in results} - gt_image_ids)
    if foreign:
        raise ValueError(f'results name {len(foreign)} image id(s) not in the ground truth: {first_few(foreign)}; '
                         f'expected the image ids of the dataset the predictions were made on')
    if image_ids is None:
        image_ids = sorted(gt_image_ids)
    else:
        image_ids = sorted({int(image_id) for image_id in image_ids})
        if not image_ids:
            raise ValueError('image_ids is empty; expected the ids of the images to score, e.g. '
                             'CocoDetection.ids, or None for every ground-truth image')
        unknown_images = [image_id for image_id in image_ids if image_id not in gt_image_ids]
        if unknown_images:
            raise ValueError(f'image_ids has {len(unknown_images)} id(s) not in the ground truth: '
                             f'{first_few(unknown_images)}; expected ids of ground-truth images, e.g. '
                             f'CocoDetection.ids, or None for all')
    metrics = {}
    for iou_type in iou_types:
        prefix = _METRIC_PREFIXES[iou_type]
        coco_dt = _load_results(coco_gt, results, iou_type)
        with _quietly():
            evaluator = _pycocotools('cocoeval', 'COCO evaluation').COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(_SUMMARY_METRICS, evaluator.stats):
            metrics[f'{prefix}_{name}'] = _percent(value)
        # precision: (T IoU thresholds, R recall points, K categories, A areas, M max detections)
        precision = evaluator.eval['precision'][:, :, :, 0, -1]  # area 'all', 100 detections
        per_class = []
        for category_index in range(precision.shape[2]):
            scored = precision[:, :, category_index]
            scored = scored[scored > -1]
            per_class.append(100.0 * float(scored.mean()) if scored.size else math.nan)
        metrics[f'{prefix}_ap_per_class'] = per_class
    return metrics
