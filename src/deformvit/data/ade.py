"""ADE20K semantic segmentation: the folder layout, the training / evaluation pipelines and mIoU.

The protocol is the one of mmsegmentation's ADE20K config, used for the UperNet results of DAT
(CVPR 2022) Table 5:

* training: keep-ratio resize to (2048, 512) times a random ratio in [0.5, 2.0]; a random
  512x512 crop, redrawn up to 10 times until no class covers 75 % or more of its labelled pixels;
  horizontal flip with probability 0.5; photometric distortion; ImageNet normalisation; padding
  to 512x512 (image 0, label ``ignore_index``);
* evaluation: keep-ratio resize to (2048, 512) and normalisation; the label stays at the
  annotation's resolution, since mIoU is computed there after the logits are resized back.

Images are resized bilinearly without antialiasing (as OpenCV's ``INTER_LINEAR`` in mmcv), labels
with nearest neighbour. Random draws use torch's global RNG, so ``torch.manual_seed`` (and the
DataLoader's per-worker seeding) make the pipeline reproducible.

As in ``deformvit.data``, a sample whose image or annotation cannot be decoded comes back as
``None``; ``collate_segmentation`` drops it and counts it. So does a sample whose annotation has no
labelled pixel (all 0 with ``reduce_zero_label``, or all ``ignore_index``): its cross entropy would
average over no pixel and be NaN, and it scores nothing in evaluation. A split none of whose
annotations has a labelled pixel is refused when the dataset is built.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .common import DatasetError, check_sides, collate_readable, first_few, keep_ratio_size, random_int
from .images import decode_rgb

__all__ = ['ADE20K_CLASSES', 'SPLITS', 'SegmentationFolder', 'SegmentationMetrics', 'collate_segmentation']

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair',
    'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion',
    'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper',
    'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table',
    'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table',
    'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island',
    'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman',
    'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy',
    'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag',
    'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot',
    'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce',
    'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
SPLITS = ('training', 'validation')

_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_ANNOTATION_EXTENSIONS = ('.png',)
_LAYOUT = 'root/images/<split>/<name>.jpg with root/annotations/<split>/<name>.png'
_CROP_TRIES = 10
# PhotoMetricDistortion of mmsegmentation, on the 0..255 scale; hue in OpenCV units (180 per turn).
_BRIGHTNESS_DELTA = 32.0
_CONTRAST_RANGE = (0.5, 1.5)
_SATURATION_RANGE = (0.5, 1.5)
_HUE_DELTA = 18
_HUE_UNITS_PER_TURN = 180.0


def _coin(probability: float = 0.5) -> bool:
    """True with ``probability``, drawn from torch's global RNG."""
    return torch.rand(()).item() < probability


def _uniform(low: float, high: float) -> float:
    """A float drawn uniformly from [low, high) with torch's global RNG."""
    return low + (high - low) * torch.rand(()).item()


def _files_by_stem(folder: str, extensions: Tuple[str, ...], what: str) -> Dict[str, str]:
    """``{stem: path}`` of the files directly in ``folder`` with one of ``extensions`` (any case)."""
    if not os.path.isdir(folder):
        raise DatasetError(
            f'{what} folder {folder!r} does not exist; expected the ADE20K layout {_LAYOUT}; '
            f'check root and split')
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(extensions)
                   and os.path.isfile(os.path.join(folder, name)))
    if not names:
        raise DatasetError(
            f'{what} folder {folder!r} holds no {"/".join(extensions)} files; expected the ADE20K '
            f'layout {_LAYOUT}; check that the dataset was fully extracted there')
    files: Dict[str, str] = {}
    repeated = []
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem in files:
            repeated.append(stem)
        files[stem] = os.path.join(folder, name)
    if repeated:
        raise DatasetError(
            f'{what} folder {folder!r} holds several files named {first_few(repeated, quote=True)} with different '
            f'extensions; expected one file per name, as images and annotations are paired by name; '
            f'remove the extra copies')
    return files


def _read_annotation(path: str) -> Optional[np.ndarray]:
    """The class indices of the annotation PNG at ``path``, (H, W) for a single-channel file; None
    when it cannot be decoded."""
    try:
        with Image.open(path) as file:
            return np.array(file)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return None


def _read_classes_file(path: str) -> List[str]:
    """The non-empty lines of ``path``, stripped."""
    with open(path, encoding='utf-8') as file:
        names = [line.strip() for line in file if line.strip()]
    if not names:
        raise DatasetError(
            f'class list {path!r} names no classes; expected one class name per line in label order; '
            f'fill it in or delete it to use the 150 ADE20K classes')
    return names


def _scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply the HSV saturation of a (3, H, W) image by ``factor``, keeping hue and value.

    With value V = max channel and saturation S = (V - min) / V, every channel is
    ``V - S * V * f(hue)``; scaling S by ``k`` therefore moves each channel to ``V - k * (V - c)``.
    S is capped at 1 (as OpenCV clips it), i.e. ``k`` at ``V / (V - min)``.
    """
    value = image.amax(0, keepdim=True)  # (1, H, W)
    spread = value - image.amin(0, keepdim=True)  # (1, H, W), V * S
    pixel_factor = torch.clamp(value / spread.clamp_min(1e-6), max=factor)  # (1, H, W)
    return value - pixel_factor * (value - image)


def _maybe_contrast(image: torch.Tensor) -> torch.Tensor:
    """With probability 1/2, multiply a 0..255 image by a factor drawn from ``_CONTRAST_RANGE``."""
    if _coin():
        image = (image * _uniform(*_CONTRAST_RANGE)).clamp(0.0, 255.0)
    return image


def _photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion of a (3, H, W) float image on the 0..255 scale.

    In order, each with probability 1/2: add a brightness delta in [-32, 32]; multiply by a
    contrast factor in [0.5, 1.5] (here or, with equal odds, last); multiply the HSV saturation by
    a factor in [0.5, 1.5]; rotate the hue by an integer in [-18, 18] of 180 units per turn.
    Values are clipped to [0, 255] after every step.
    """
    if _coin():
        image = (image + _uniform(-_BRIGHTNESS_DELTA, _BRIGHTNESS_DELTA)).clamp(0.0, 255.0)
    contrast_first = _coin()
    if contrast_first:
        image = _maybe_contrast(image)
    if _coin():
        image = _scale_saturation(image, _uniform(*_SATURATION_RANGE)).clamp(0.0, 255.0)
    if _coin():
        hue_shift = random_int(-_HUE_DELTA, _HUE_DELTA) / _HUE_UNITS_PER_TURN
        image = F.adjust_hue(image / 255.0, hue_shift) * 255.0
    if not contrast_first:
        image = _maybe_contrast(image)
    return image


class SegmentationFolder(Dataset):
    """Images and label maps in the ADE20K layout, with the ADE20K training / evaluation pipeline.

    Layout: ``root/images/<split>/<name>.{jpg,jpeg,png}`` and ``root/annotations/<split>/<name>.png``
    (the ``ADEChallengeData2016`` folder), paired by file name without extension. Images without
    an annotation and annotations without an image are left out and counted in ``skipped``.
    Annotations are single-channel PNGs of class indices, at the image's resolution.

    ``__getitem__`` returns ``(image, label)``, or ``None`` when the image or the annotation
    cannot be decoded or the annotation has no labelled pixel (use ``collate_segmentation``, which
    drops and counts them):

    * ``train=True``: image float32 (3, crop_h, crop_w), normalised and padded with 0; label int64
      (crop_h, crop_w), ``ignore_index`` in the padding;
    * ``train=False``: image float32 (3, h, w) resized keep-ratio to ``scale`` and normalised;
      label int64 at the annotation's own resolution.

    Args:
        root: dataset folder holding ``images/`` and ``annotations/``.
        split: ``'training'`` or ``'validation'``.
        classes: class names in label order. Default: ``root/classes.txt`` (one name per line)
            if present, else ``ADE20K_CLASSES``.
        train: apply the random training pipeline instead of the evaluation one.
        crop_size: ``(height, width)`` of the training crop.
        scale: keep-ratio resize target: the image is scaled as large as it can be with its long
            side at most ``max(scale)`` and its short side at most ``min(scale)``.
        ratio_range: training only: ``scale`` is multiplied by a ratio drawn uniformly from it.
        cat_max_ratio: the training crop is redrawn (up to 10 draws) until it holds at least two
            classes and the most frequent covers less than this fraction of its labelled pixels;
            1 draws once.
        hflip: probability of a horizontal flip in training.
        photometric: apply mmsegmentation's photometric distortion in training.
        reduce_zero_label: annotation value 0 ('other' in ADE20K) becomes ``ignore_index`` and
            values 1..K become labels 0..K-1; a value equal to ``ignore_index`` stays ignored.
        ignore_index: label of pixels that are not scored.
        mean: per-channel mean for normalisation, on the 0..1 scale.
        std: per-channel standard deviation for normalisation, on the 0..1 scale.

    The constructor decodes annotations in order until one has a labelled pixel (normally the
    first, so it stays cheap) and refuses the split when none has: reading every annotation up
    front would take minutes on ADE20K, and the annotations of a usable split with some empty ones
    are skipped one by one when read.

    Raises:
        ValueError: unknown ``split``, no ``classes``, an augmentation setting out of range, or a
            ``crop_size`` or ``scale`` that is not two positive whole numbers.
        DatasetError: the image or annotation folder is missing or empty, names repeat, no image
            has an annotation, no annotation has a labelled pixel (or none can be read), or
            ``classes.txt`` is empty. ``__getitem__`` raises it for an
            annotation that is not single-channel, has a size other than its image's, or holds
            labels outside the class range.
    """

    def __init__(
            self,
            root: Union[str, os.PathLike],
            split: str,
            classes: Optional[Sequence[str]] = None,
            train: bool = False,
            crop_size: Tuple[int, int] = (512, 512),
            scale: Tuple[int, int] = (2048, 512),
            ratio_range: Tuple[float, float] = (0.5, 2.0),
            cat_max_ratio: float = 0.75,
            hflip: float = 0.5,
            photometric: bool = True,
            reduce_zero_label: bool = True,
            ignore_index: int = 255,
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        root = os.fspath(root)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected 'training' or 'validation' "
                             f"(the sub-folders of root/images and root/annotations)")
        if not 0.0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f'ratio_range {tuple(ratio_range)} is not an interval of positive ratios; '
                             f'expected (low, high) with 0 < low <= high, e.g. (0.5, 2.0)')
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f'cat_max_ratio {cat_max_ratio} is outside (0, 1]; expected e.g. 0.75, '
                             f'or 1 to accept the first random crop')
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f'hflip {hflip} is not a probability; expected a value in [0, 1], e.g. 0.5')
        crop_size = check_sides('crop_size', crop_size, 'the (height, width) of the training crop, e.g. (512, 512)')
        scale = check_sides('scale', scale, 'the (long, short) sides of the keep-ratio resize, e.g. (2048, 512)')
        if classes is None:
            classes_file = os.path.join(root, 'classes.txt')
            classes = _read_classes_file(classes_file) if os.path.isfile(classes_file) else ADE20K_CLASSES
        classes = list(classes)
        if not classes:
            raise ValueError('classes is empty; expected the class names in label order, '
                             'or None for root/classes.txt or the 150 ADE20K classes')

        images = _files_by_stem(os.path.join(root, 'images', split), _IMAGE_EXTENSIONS, 'image')
        annotations = _files_by_stem(os.path.join(root, 'annotations', split), _ANNOTATION_EXTENSIONS,
                                     'annotation')
        paired = sorted(images.keys() & annotations.keys())
        if not paired:
            raise DatasetError(
                f'none of the {len(images)} images of {root!r} ({split}) has an annotation of the same '
                f'name (images e.g. {first_few(sorted(images)[:3], quote=True)}, annotations e.g. '
                f'{first_few(sorted(annotations)[:3], quote=True)}); expected {_LAYOUT}; check that both folders '
                f'come from the same dataset')

        self.root = root
        self.split = split
        self.classes = classes
        self.num_classes = len(classes)
        self.train = train
        self.crop_size = crop_size
        self.scale = scale
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        self.photometric = photometric
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.mean = list(mean)
        self.std = list(std)
        self.samples: List[Tuple[str, str]] = [(images[stem], annotations[stem]) for stem in paired]
        self.skipped = {'no_annotation': len(images.keys() - annotations.keys()),
                        'no_image': len(annotations.keys() - images.keys())}
        self._refuse_if_nothing_labelled()

    def _any_labelled(self, annotation: np.ndarray) -> bool:
        """Whether an annotation array has a pixel that is scored: neither ``ignore_index`` nor, with
        ``reduce_zero_label``, 0."""
        ignored = annotation == self.ignore_index
        if self.reduce_zero_label:
            ignored |= annotation == 0
        return not ignored.all()

    def _refuse_if_nothing_labelled(self) -> None:
        """Raise DatasetError when no annotation has a labelled pixel; stops at the first that has one.

        An annotation that is not single-channel ends the search too: reading it raises its own error.
        """
        unreadable = 0
        for _, annotation_path in self.samples:
            annotation = _read_annotation(annotation_path)
            if annotation is None:
                unreadable += 1
            elif annotation.ndim != 2 or self._any_labelled(annotation):
                return
        ignored, values = ((f'0 or {self.ignore_index}', f'1..{self.num_classes}') if self.reduce_zero_label
                           else (f'{self.ignore_index}', f'0..{self.num_classes - 1}'))
        raise DatasetError(
            f'no annotation of {self.root!r} ({self.split}) has a labelled pixel: of {len(self.samples)} '
            f'annotation(s), {unreadable} cannot be read and the others are all {ignored} (ignored); expected '
            f'class values {values} in the annotations; check that they are the label maps, not blank '
            f'placeholders, and reduce_zero_label')

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> str:
        """One line: split, root, pairs, classes and the unpaired files left out."""
        text = (f'{self.split} split of {self.root!r}: {len(self)} image/annotation pairs, '
                f'{self.num_classes} classes')
        if self.skipped['no_annotation'] or self.skipped['no_image']:
            text += (f'; left out {self.skipped["no_annotation"]} images without annotation and '
                     f'{self.skipped["no_image"]} annotations without image')
        return text

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        image_path, annotation_path = self.samples[index]
        rgb = decode_rgb(image_path)
        if rgb is None:
            return None
        annotation = _read_annotation(annotation_path)  # (H, W) class indices
        if annotation is None:
            return None
        image = F.pil_to_tensor(rgb)  # (3, H, W) uint8
        label = self._label_from_annotation(annotation, annotation_path)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise DatasetError(
                f'masks of the wrong size: annotation {annotation_path!r} is {label.shape[1]}x{label.shape[0]} '
                f'but its image {image_path!r} is {image.shape[2]}x{image.shape[1]}; expected the '
                f'annotation at the resolution of its image; regenerate or remove the pair')
        if not self._any_labelled(annotation):
            return None
        image = image.float()  # (3, H, W) on the 0..255 scale
        if self.train:
            return self._train_pipeline(image, label)
        size = keep_ratio_size(image.shape[1], image.shape[2], self.scale)
        image = F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
        return self._normalize(image), label

    def _label_from_annotation(self, annotation: np.ndarray, path: str) -> torch.Tensor:
        """(H, W) int64 labels of an annotation array, zero reduced and range-checked."""
        if annotation.ndim != 2:
            raise DatasetError(
                f'annotation {path!r} has shape {annotation.shape}; expected a single-channel PNG '
                f'of class indices (mode L, P or I;16), not a colour rendering')
        label = torch.from_numpy(annotation.astype(np.int64))
        if self.reduce_zero_label:
            label = torch.where((label == 0) | (label == self.ignore_index), self.ignore_index, label - 1)
        outside = (label >= self.num_classes) & (label != self.ignore_index)
        if outside.any():
            values = torch.unique(label[outside]).tolist()
            reduced = ' after reduce_zero_label (annotation value - 1)' if self.reduce_zero_label else ''
            raise DatasetError(
                f'labels outside the class range in annotation {path!r}: {first_few(values, quote=True)}{reduced}, '
                f'but there are {self.num_classes} classes (labels 0..{self.num_classes - 1}, '
                f'{self.ignore_index} ignored); check classes / root/classes.txt and reduce_zero_label')
        return label

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) 0..255 image -> (x / 255 - mean) / std."""
        return F.normalize(image / 255.0, self.mean, self.std)

    def _train_pipeline(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random resize, class-balanced crop, flip, photometric distortion, normalise, pad."""
        ratio = _uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = list(keep_ratio_size(image.shape[1], image.shape[2], scale))
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        label = F.resize(label[None], size, interpolation=InterpolationMode.NEAREST)[0]

        crop_height, crop_width = self.crop_size
        top, left = self._crop_origin(label)
        image = image[:, top:top + crop_height, left:left + crop_width]
        label = label[top:top + crop_height, left:left + crop_width]
        if _coin(self.hflip):
            image, label = F.horizontal_flip(image), F.horizontal_flip(label)
        if self.photometric:
            image = _photometric_distortion(image)
        image = self._normalize(image)

        padding = [0, 0, crop_width - image.shape[2], crop_height - image.shape[1]]  # left, top, right, bottom
        image = F.pad(image, padding, fill=0.0)
        label = F.pad(label[None], padding, fill=self.ignore_index)[0]
        return image, label

    def _crop_origin(self, label: torch.Tensor) -> Tuple[int, int]:
        """``(top, left)`` of a random crop; redrawn until it passes ``cat_max_ratio`` (last draw kept)."""
        crop_height, crop_width = self.crop_size
        height, width = label.shape
        draws = _CROP_TRIES if self.cat_max_ratio < 1.0 else 1
        for _ in range(draws):
            top = random_int(0, max(height - crop_height, 0))
            left = random_int(0, max(width - crop_width, 0))
            window = label[top:top + crop_height, left:left + crop_width]
            counts = torch.bincount(window[window != self.ignore_index])
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return top, left


def _stack_if_same_shape(tensors: List[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
    """``torch.stack(tensors)`` when their shapes agree, else the list itself."""
    if all(tensor.shape == tensors[0].shape for tensor in tensors):
        return torch.stack(tensors)
    return tensors


def collate_segmentation(
        batch: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]],
) -> Tuple[Union[torch.Tensor, List[torch.Tensor], None], Union[torch.Tensor, List[torch.Tensor], None], int]:
    """Collate ``(image, label)`` samples, dropping the ``None`` of unreadable files.

    Args:
        batch: samples from ``SegmentationFolder``; ``None`` marks an unreadable file.

    Returns:
        ``(images, labels, skipped)``: images and labels of the readable samples, each stacked
        into one tensor when all its shapes agree (training crops) and a list of tensors
        otherwise (evaluation at each image's own size), and the number of samples dropped;
        ``(None, None, skipped)`` when every sample was unreadable.
    """
    return collate_readable(batch, lambda kept: (_stack_if_same_shape([image for image, _ in kept]),
                                                 _stack_if_same_shape([label for _, label in kept])))


class SegmentationMetrics:
    """Confusion-matrix metrics of semantic segmentation: mIoU, mAcc and aAcc, as mmsegmentation.

    ``update`` adds predictions to ``confusion``, an int64 (num_classes, num_classes) matrix
    (rows: ground truth, columns: prediction) kept on the device of the inputs; in distributed
    evaluation, ``all_reduce`` it before ``compute``. Pixels whose target is ``ignore_index`` are
    not counted.

    ``compute`` returns percentages: per class, IoU = TP / (TP + FP + FN) (nan when the class
    neither occurs nor is predicted) and accuracy = TP / (TP + FN) (nan when the class does not
    occur); 'miou' and 'macc' are their means over the classes that are not nan, and 'aacc' is the
    fraction of counted pixels predicted correctly.

    Args:
        num_classes: number of classes; labels are 0..num_classes-1.
        ignore_index: target value of pixels that are not scored.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f'num_classes {num_classes} is not a class count; expected at least 1, e.g. 150')
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true label maps of the same shape (any leading dims).

        Args:
            prediction: class indices, e.g. ``logits.argmax(1)`` after resizing the logits to the
                label resolution.
            target: true labels, ``ignore_index`` where not scored.

        Raises:
            ValueError: shapes differ, the prediction is not integer, or a label is outside
                0..num_classes-1 (other than ``ignore_index`` in the target).
        """
        if prediction.shape != target.shape:
            raise ValueError(
                f'prediction of shape {tuple(prediction.shape)} and target of shape {tuple(target.shape)} '
                f'differ; expected class indices at the label resolution (resize the logits to the '
                f'label size before the argmax)')
        if prediction.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f'prediction ({prediction.dtype}) and target ({target.dtype}) must hold integer class '
                f'indices; pass logits.argmax(1), not the logits or probabilities')
        scored = target != self.ignore_index
        target = target[scored].long()
        prediction = prediction[scored].long()
        if target.numel():
            lowest, highest = (value.item() for value in torch.aminmax(torch.cat([target, prediction])))
            if lowest < 0 or highest >= self.num_classes:
                raise ValueError(
                    f'labels outside 0..{self.num_classes - 1}: prediction and scored target span '
                    f'{lowest}..{highest} ({self.ignore_index} in the target is not scored); check '
                    f'num_classes and ignore_index')
        if self.confusion.device != target.device:
            self.confusion = self.confusion.to(target.device)
        pair_index = target * self.num_classes + prediction  # row-major (truth, prediction) cell
        counts = torch.bincount(pair_index, minlength=self.num_classes ** 2)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def compute(self) -> Dict[str, Union[float, List[float]]]:
        """``{'miou', 'macc', 'aacc': float, 'iou', 'acc': per-class list}``, all in percent."""
        confusion = self.confusion.double()
        true_positive = confusion.diagonal()
        ground_truth = confusion.sum(1)
        predicted = confusion.sum(0)
        iou = true_positive / (ground_truth + predicted - true_positive) * 100  # 0 / 0 -> nan
        accuracy = true_positive / ground_truth * 100
        overall = true_positive.sum() / ground_truth.sum() * 100
        return {
            'miou': iou.nanmean().item(),
            'macc': accuracy.nanmean().item(),
            'aacc': overall.item(),
            'iou': iou.tolist(),
            'acc': accuracy.tolist(),
        }
