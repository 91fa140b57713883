"""ImageNet-style class folders for classification.

``ImageFolderDataset`` reads an ImageNet-style tree ``root/<class>/**/<image>`` and checks it
in the constructor, so a wrong path or an empty class folder fails before training starts.
Files that turn out unreadable at load time (zero bytes, truncated, not an image) come back
as ``None``; ``collate_skipping_corrupt`` drops them from the batch and counts them.
"""
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, default_collate

from .common import IMAGE_EXTENSIONS, DatasetError, collate_readable, find_images, first_few, path_problem, refuse
from .images import decode_rgb

__all__ = ['ImageFolderDataset', 'collate_skipping_corrupt', 'validation_folder']


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
        problem = path_problem(root, folder=True)
        if problem:
            raise DatasetError(
                f'dataset root {root!r} {problem}; expected a folder with one sub-folder of images '
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
                    problems.append(f'missing class folders {first_few(missing, quote=True)}')
                if extra:
                    problems.append(f'extra class folders {first_few(extra, quote=True)} not in classes')
                if duplicated:
                    problems.append(f'classes listed twice {first_few(duplicated, quote=True)}')
                raise DatasetError(
                    f'class folders of {root!r} do not match the given classes: '
                    f'{"; ".join(problems)}; expected exactly one folder per given class '
                    f'(e.g. the train set\'s classes) and no others')
        samples = []
        empty = []
        for index, name in enumerate(classes):
            paths = find_images(os.path.join(root, name))
            if not paths:
                empty.append(name)
            samples.extend((path, index) for path in paths)
        refuse([repr(name) for name in empty], f'class folder(s) of {root!r} hold no images',
               f'expected at least one file with extension {", ".join(IMAGE_EXTENSIONS)} in each; add images or '
               'remove the folder(s)')

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
        image = decode_rgb(path)
        if image is not None and self.transform is not None:
            image = self.transform(image)
        return None if image is None else (image, target)


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
    return collate_readable(batch, default_collate)
