"""Datasets: ImageNet-style class folders, the embedded MNIST digits, COCO-format detection data,
ADE20K-layout segmentation data and the embedded digit scenes.

Every dataset checks its files in the constructor and raises :class:`DatasetError` with what
was expected, so a wrong path fails before any training starts; files that turn out unreadable
at load time are skipped and counted by the collate functions.
"""
from .common import IMAGE_EXTENSIONS, DatasetError, image_files, iter_images
from .digits import DigitsDataset
from .folders import ImageFolderDataset, collate_skipping_corrupt, validation_folder

__all__ = [
    'IMAGE_EXTENSIONS', 'DatasetError', 'DigitsDataset', 'ImageFolderDataset', 'collate_skipping_corrupt',
    'image_files', 'iter_images', 'validation_folder',
]
