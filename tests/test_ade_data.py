"""ADE20K segmentation data: folder pairing, the mmsegmentation training / evaluation pipelines, mIoU."""
import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from deformvit.data import DatasetError, ade
from deformvit.data.ade import (
    ADE20K_CLASSES, SegmentationFolder, SegmentationMetrics, _scale_saturation, collate_segmentation,
)

RED_PER_VALUE = 40  # images whose red channel is 40 x the annotation value, so colour encodes the label


def _colour_of(annotation: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image whose red channel encodes ``annotation``; green and blue vary."""
    height, width = annotation.shape
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = annotation.astype(np.int64) * RED_PER_VALUE
    image[..., 1] = np.arange(width, dtype=np.uint8)[None, :] * 5
    image[..., 2] = 200
    return image


def _write_pair(root, stem, annotation, split='training', image=None, image_ext='.png'):
    """Save ``annotation`` (H, W) uint8 and its image (default: ``_colour_of(annotation)``)."""
    image_dir, annotation_dir = root / 'images' / split, root / 'annotations' / split
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_colour_of(annotation) if image is None else image).save(image_dir / f'{stem}{image_ext}')
    Image.fromarray(annotation.astype(np.uint8)).save(annotation_dir / f'{stem}.png')


def _random_annotation(height, width, seed=0, values=(1, 2, 3, 4)):
    return np.random.default_rng(seed).choice(values, (height, width)).astype(np.uint8)


def _denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised (3, H, W) -> the 0..255 image."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (image * std + mean) * 255


def _label_from_colour(image: torch.Tensor) -> torch.Tensor:
    """The reduced label a ``_colour_of`` image encodes (annotation value - 1)."""
    return (_denormalize(image)[0] / RED_PER_VALUE).round().long() - 1


@pytest.fixture
def ade_root(tmp_path):
    """Two training pairs (24x16 and 20x12), one validation pair (100x60)."""
    root = tmp_path / 'ade'
    _write_pair(root, 'ADE_train_00000001', _random_annotation(16, 24, seed=1))
    _write_pair(root, 'ADE_train_00000002', _random_annotation(12, 20, seed=2))
    _write_pair(root, 'ADE_val_00000001', _random_annotation(60, 100, seed=3), split='validation')
    return root


def test_ade20k_classes_are_the_150_scene_parsing_names_in_label_order():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:8] == ('wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed')
    assert ADE20K_CLASSES[-3:] == ('glass', 'clock', 'flag')
    assert all(name == name.strip() for name in ADE20K_CLASSES)


def test_images_and_annotations_are_paired_by_name_and_unpaired_files_are_counted(ade_root):
    _write_pair(ade_root, 'jpeg_image', _random_annotation(8, 8), image_ext='.JPEG')
    Image.fromarray(_colour_of(_random_annotation(8, 8))).save(ade_root / 'images' / 'training' / 'lonely.jpg')
    Image.fromarray(_random_annotation(8, 8)).save(ade_root / 'annotations' / 'training' / 'orphan_a.png')
    Image.fromarray(_random_annotation(8, 8)).save(ade_root / 'annotations' / 'training' / 'orphan_b.png')
    (ade_root / 'images' / 'training' / 'notes.txt').write_text('not an image extension: ignored')

    dataset = SegmentationFolder(ade_root, 'training')
    names = [(path.split('/')[-1], annotation.split('/')[-1]) for path, annotation in dataset.samples]
    assert names == [('ADE_train_00000001.png', 'ADE_train_00000001.png'),
                     ('ADE_train_00000002.png', 'ADE_train_00000002.png'),
                     ('jpeg_image.JPEG', 'jpeg_image.png')]
    assert dataset.skipped == {'no_annotation': 1, 'no_image': 2}
    assert dataset.summary() == (
        f"training split of {str(ade_root)!r}: 3 image/annotation pairs, 150 classes; "
        f"left out 1 images without annotation and 2 annotations without image")
    assert SegmentationFolder(ade_root, 'validation').summary().endswith('1 image/annotation pairs, 150 classes')


def test_training_sample_is_a_normalised_crop_padded_with_zero_image_and_ignore_label(ade_root):
    dataset = SegmentationFolder(ade_root, 'training', train=True, crop_size=(20, 32), scale=(24, 16),
                                 ratio_range=(1.0, 1.0), hflip=0.0, photometric=False)
    image, label = dataset[0]  # 24x16 image, not resized, smaller than the 32x20 crop
    assert image.shape == (3, 20, 32) and image.dtype == torch.float32
    assert label.shape == (20, 32) and label.dtype == torch.int64
    assert (image[:, 16:, :] == 0).all() and (image[:, :, 24:] == 0).all()
    assert (label[16:, :] == 255).all() and (label[:, 24:] == 255).all()
    annotation = np.array(Image.open(ade_root / 'annotations' / 'training' / 'ADE_train_00000001.png'))
    assert torch.equal(label[:16, :24], torch.from_numpy(annotation).long() - 1)
    assert torch.equal(_label_from_colour(image[:, :16, :24]), label[:16, :24])


def test_default_training_pipeline_gives_512_crops_of_known_labels(ade_root):
    dataset = SegmentationFolder(ade_root, 'training', train=True)
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 512, 512) and label.shape == (512, 512)
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_training_resize_scales_labels_by_nearest_neighbour(tmp_path):
    annotation = _random_annotation(8, 16, seed=4)
    _write_pair(tmp_path, 'a', annotation)
    dataset = SegmentationFolder(tmp_path, 'training', train=True, crop_size=(16, 32), scale=(32, 16),
                                 ratio_range=(1.0, 1.0), hflip=0.0, photometric=False)
    _, label = dataset[0]  # 16x8 -> 32x16: each annotation pixel becomes a 2x2 block
    expected = torch.from_numpy(annotation).long().repeat_interleave(2, 0).repeat_interleave(2, 1) - 1
    assert torch.equal(label, expected)


def test_reduce_zero_label_ignores_other_and_shifts_classes_down(tmp_path):
    annotation = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    _write_pair(tmp_path, 'a', annotation, split='validation')
    _, label = SegmentationFolder(tmp_path, 'validation')[0]
    assert label.tolist() == [[255, 0, 1], [149, 255, 2]]
    _, label = SegmentationFolder(tmp_path, 'validation', classes=[str(i) for i in range(151)],
                                  reduce_zero_label=False)[0]
    assert label.tolist() == [[0, 1, 2], [150, 255, 3]]


def test_flip_moves_image_and_label_together(ade_root):
    dataset = SegmentationFolder(ade_root, 'training', train=True, crop_size=(16, 24), scale=(24, 16),
                                 ratio_range=(1.0, 1.0), hflip=0.5, photometric=False)
    annotation = torch.from_numpy(
        np.array(Image.open(ade_root / 'annotations' / 'training' / 'ADE_train_00000001.png'))).long() - 1
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, label = dataset[0]
        assert torch.equal(_label_from_colour(image), label)
        if torch.equal(label, annotation.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(label, annotation)
    assert 0 < flipped < 12


def test_crop_is_redrawn_until_no_class_covers_cat_max_ratio(tmp_path):
    annotation = np.ones((16, 32), dtype=np.uint8)
    annotation[:, 16:] = 2  # a 16x16 crop at column offset x holds class 2 in x of its 16 columns
    _write_pair(tmp_path, 'halves', annotation)

    def largest_class_shares(cat_max_ratio):
        dataset = SegmentationFolder(tmp_path, 'training', train=True, crop_size=(16, 16), scale=(32, 16),
                                     ratio_range=(1.0, 1.0), cat_max_ratio=cat_max_ratio, photometric=False)
        shares = []
        for seed in range(30):
            torch.manual_seed(seed)
            _, label = dataset[0]
            shares.append(torch.bincount(label.flatten(), minlength=2).max().item() / label.numel())
        return shares

    assert max(largest_class_shares(0.9)) < 0.9
    assert max(largest_class_shares(1.0)) >= 0.9  # a single draw often lands near one end


def test_photometric_distortion_changes_colours_but_not_grey_or_labels(tmp_path):
    annotation = _random_annotation(16, 24, seed=5)
    grey = np.repeat(np.arange(16 * 24, dtype=np.uint8).reshape(16, 24, 1) % 200 + 20, 3, axis=2)
    _write_pair(tmp_path, 'grey', annotation, image=grey)
    _write_pair(tmp_path, 'colour', annotation)
    settings = dict(train=True, crop_size=(16, 24), scale=(24, 16), ratio_range=(1.0, 1.0), hflip=0.0)
    plain = SegmentationFolder(tmp_path, 'training', photometric=False, **settings)
    distorted = SegmentationFolder(tmp_path, 'training', photometric=True, **settings)
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        grey_image, grey_label = distorted[1]
        rgb = _denormalize(grey_image)
        assert torch.allclose(rgb[0], rgb[1], atol=1e-3) and torch.allclose(rgb[1], rgb[2], atol=1e-3)
        assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3
        colour_image, colour_label = distorted[0]
        assert torch.equal(grey_label, plain[1][1]) and torch.equal(colour_label, plain[0][1])
        changed += not torch.allclose(colour_image, plain[0][0])
    assert changed >= 6  # each of the 4 steps happens with probability 1/2


def test_saturation_scaling_matches_hsv():
    pixels = torch.tensor([[200., 100., 50.], [10., 250., 120.], [90., 90., 90.], [255., 0., 128.]])
    image = pixels.T.reshape(3, 2, 2)  # (4, RGB) -> (3, 2, 2)
    for factor in (0.5, 1.3, 3.0):
        scaled = _scale_saturation(image, factor).reshape(3, 4).T
        for before, after in zip(pixels.tolist(), scaled.tolist()):
            hue, saturation, value = colorsys.rgb_to_hsv(*(channel / 255 for channel in before))
            expected = colorsys.hsv_to_rgb(hue, min(saturation * factor, 1.0), value)
            assert after == pytest.approx([channel * 255 for channel in expected], abs=1e-3)


def test_same_seed_gives_the_same_training_sample(ade_root):
    dataset = SegmentationFolder(ade_root, 'training', train=True, crop_size=(32, 32))
    torch.manual_seed(7)
    first = dataset[0]
    torch.manual_seed(7)
    again = dataset[0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize('width, height, resized', [
    (100, 60, (512, 853)),  # the short side reaches 512 first
    (400, 50, (256, 2048)),  # the long side reaches 2048 first
])
def test_eval_sample_is_resized_keep_ratio_and_label_keeps_the_annotation_resolution(
        tmp_path, width, height, resized):
    annotation = _random_annotation(height, width, seed=6)
    _write_pair(tmp_path, 'a', annotation, split='validation')
    image, label = SegmentationFolder(tmp_path, 'validation')[0]
    assert image.shape == (3, *resized) and image.dtype == torch.float32
    assert torch.equal(label, torch.from_numpy(annotation).long() - 1)


def test_classes_txt_sets_the_classes_and_the_argument_overrides_it(ade_root):
    assert SegmentationFolder(ade_root, 'training').classes == list(ADE20K_CLASSES)
    (ade_root / 'classes.txt').write_text('other thing\nfloor\nwall\nsky\n\n')
    dataset = SegmentationFolder(ade_root, 'training')
    assert dataset.classes == ['other thing', 'floor', 'wall', 'sky'] and dataset.num_classes == 4
    assert SegmentationFolder(ade_root, 'training', classes=['a', 'b', 'c', 'd', 'e']).num_classes == 5


@pytest.mark.parametrize('remove, match', [
    ('images/training', r"image folder .*images/training' does not exist"),
    ('annotations/training', r"annotation folder .*annotations/training' does not exist"),
])
def test_missing_folders_are_named(ade_root, remove, match):
    for path in (ade_root / remove).iterdir():
        path.unlink()
    (ade_root / remove).rmdir()
    with pytest.raises(DatasetError, match=match):
        SegmentationFolder(ade_root, 'training')


@pytest.mark.parametrize('empty, match', [
    ('images', r"image folder .* holds no \.jpg/\.jpeg/\.png files"),
    ('annotations', r"annotation folder .* holds no \.png files"),
])
def test_empty_folders_are_named(ade_root, empty, match):
    for path in (ade_root / empty / 'training').iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=match):
        SegmentationFolder(ade_root, 'training')


def test_no_image_with_an_annotation_is_an_error(tmp_path):
    (tmp_path / 'images' / 'training').mkdir(parents=True)
    (tmp_path / 'annotations' / 'training').mkdir(parents=True)
    Image.fromarray(_colour_of(_random_annotation(4, 4))).save(tmp_path / 'images' / 'training' / 'a.jpg')
    Image.fromarray(_random_annotation(4, 4)).save(tmp_path / 'annotations' / 'training' / 'b.png')
    with pytest.raises(DatasetError, match=r"none of the 1 images .* has an annotation of the same name"):
        SegmentationFolder(tmp_path, 'training')


def test_repeated_names_are_an_error(ade_root):
    Image.fromarray(_colour_of(_random_annotation(16, 24))).save(
        ade_root / 'images' / 'training' / 'ADE_train_00000001.jpg')
    with pytest.raises(DatasetError, match=r"several files named 'ADE_train_00000001' with different extensions"):
        SegmentationFolder(ade_root, 'training')


def test_empty_classes_txt_is_an_error(ade_root):
    (ade_root / 'classes.txt').write_text('\n\n')
    with pytest.raises(DatasetError, match=r"classes.txt' names no classes"):
        SegmentationFolder(ade_root, 'training')


@pytest.mark.parametrize('settings, match', [
    (dict(split='train'), r"unknown split 'train'; expected 'training' or 'validation'"),
    (dict(split='training', classes=[]), r'classes is empty'),
    (dict(split='training', ratio_range=(2.0, 0.5)), r'ratio_range \(2.0, 0.5\) is not an interval'),
    (dict(split='training', cat_max_ratio=0.0), r'cat_max_ratio 0.0 is outside \(0, 1\]'),
    (dict(split='training', hflip=1.5), r'hflip 1.5 is not a probability'),
    (dict(split='training', crop_size=(0, 512)), r'crop_size \(0, 512\) is not two positive whole numbers of pixels; '
                                                 r'expected the \(height, width\) of the training crop'),
    (dict(split='validation', scale=(0, 0)), r'scale \(0, 0\) is not two positive whole numbers of pixels; '
                                             r'expected the \(long, short\) sides'),
    (dict(split='validation', scale=(2048, -512)), r'scale \(2048, -512\) is not two positive'),
])
def test_bad_settings_are_rejected(ade_root, settings, match):
    with pytest.raises(ValueError, match=match):
        SegmentationFolder(ade_root, **settings)


@pytest.mark.parametrize('train', [False, True])
def test_annotation_of_the_wrong_size_is_named(tmp_path, train):
    _write_pair(tmp_path, 'a', _random_annotation(16, 24), image=_colour_of(_random_annotation(16, 20)))
    with pytest.raises(DatasetError, match=r"masks of the wrong size: annotation .*a.png' is 24x16 "
                                           r"but its image .*a.png' is 20x16"):
        SegmentationFolder(tmp_path, 'training', train=train)[0]


def test_labels_outside_the_class_range_are_named_with_the_class_count(tmp_path):
    _write_pair(tmp_path, 'a', np.array([[1, 2], [5, 6]], dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"labels outside the class range in annotation .*a.png': 4, 5 after "
                                           r"reduce_zero_label .*, but there are 4 classes"):
        SegmentationFolder(tmp_path, 'training', classes=['a', 'b', 'c', 'd'])[0]
    with pytest.raises(DatasetError, match=r"labels outside the class range .*: 5, 6, but there are 5 classes"):
        SegmentationFolder(tmp_path, 'training', classes=list('abcde'), reduce_zero_label=False)[0]


def test_colour_annotation_is_an_error(ade_root):
    Image.fromarray(_colour_of(_random_annotation(16, 24))).save(
        ade_root / 'annotations' / 'training' / 'ADE_train_00000001.png')
    with pytest.raises(DatasetError, match=r"has shape \(16, 24, 3\); expected a single-channel PNG"):
        SegmentationFolder(ade_root, 'training')[0]


def test_unreadable_image_gives_none_and_the_collate_counts_it(ade_root):
    (ade_root / 'images' / 'training' / 'ADE_train_00000002.png').write_bytes(b'not a PNG')
    dataset = SegmentationFolder(ade_root, 'training', train=True, crop_size=(32, 32))
    assert dataset[1] is None
    images, labels, skipped = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_segmentation)))
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1, 32, 32) and skipped == 1
    assert collate_segmentation([None, None]) == (None, None, 2)


@pytest.mark.parametrize('train', [False, True])
def test_annotation_without_a_labelled_pixel_is_skipped_like_an_unreadable_file(ade_root, train):
    _write_pair(ade_root, 'ADE_train_00000003', np.zeros((12, 20), dtype=np.uint8))  # all 'other': ignored
    dataset = SegmentationFolder(ade_root, 'training', train=train, crop_size=(16, 16), scale=(32, 16))
    assert len(dataset) == 3 and dataset[2] is None  # its cross entropy would average over no pixel: NaN
    images, labels, skipped = collate_segmentation([dataset[index] for index in range(3)])
    assert len(images) == 2 and len(labels) == 2 and skipped == 1


@pytest.mark.parametrize('value, reduce_zero_label, match', [
    (0, True, r"of 2 annotation\(s\), 0 cannot be read and the others are all 0 or 255 \(ignored\); expected "
              r"class values 1..150"),
    (255, False, r"of 2 annotation\(s\), 0 cannot be read and the others are all 255 \(ignored\); expected "
                 r"class values 0..149"),
])
def test_a_split_without_any_labelled_pixel_is_refused_when_built(tmp_path, value, reduce_zero_label, match):
    for stem in ('a', 'b'):
        _write_pair(tmp_path, stem, np.full((8, 8), value, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"no annotation of .* \(training\) has a labelled pixel: " + match):
        SegmentationFolder(tmp_path, 'training', reduce_zero_label=reduce_zero_label)


def test_the_labelled_pixel_check_reads_annotations_only_until_one_has_a_label(tmp_path, monkeypatch):
    _write_pair(tmp_path, 'a', np.zeros((8, 8), dtype=np.uint8))
    _write_pair(tmp_path, 'b', _random_annotation(8, 8))
    _write_pair(tmp_path, 'c', _random_annotation(8, 8))
    (tmp_path / 'annotations' / 'training' / 'c.png').write_bytes(b'not a PNG')
    read, real = [], ade._read_annotation
    monkeypatch.setattr(ade, '_read_annotation', lambda path: read.append(path) or real(path))
    dataset = SegmentationFolder(tmp_path, 'training')
    assert [path.split('/')[-1] for path in read] == ['a.png', 'b.png']  # not c.png, nor the rest of ADE20K
    assert len(dataset) == 3 and dataset[0] is None and dataset[1] is not None and dataset[2] is None
    (tmp_path / 'annotations' / 'training' / 'b.png').write_bytes(b'not a PNG')
    with pytest.raises(DatasetError, match=r"of 3 annotation\(s\), 2 cannot be read"):
        SegmentationFolder(tmp_path, 'training')
    assert SegmentationFolder(tmp_path, 'training', reduce_zero_label=False, classes=['other'])[0] is not None


def test_collate_stacks_equal_shapes_and_lists_different_ones(ade_root):
    _write_pair(ade_root, 'ADE_val_00000002', _random_annotation(30, 50, seed=7), split='validation')
    _write_pair(ade_root, 'ADE_val_00000003', _random_annotation(20, 20, seed=8), split='validation')
    dataset = SegmentationFolder(ade_root, 'validation')
    images, labels, skipped = collate_segmentation([dataset[0], None, dataset[1], dataset[2]])
    assert skipped == 1
    assert isinstance(images, list) and [tuple(image.shape) for image in images] == [
        (3, 512, 853), (3, 512, 853), (3, 512, 512)]
    assert isinstance(labels, list) and [tuple(label.shape) for label in labels] == [(60, 100), (30, 50), (20, 20)]
    images, labels, _ = collate_segmentation([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 512, 853) and isinstance(labels, list)


def test_perfect_prediction_scores_100():
    target = torch.tensor([[0, 1, 2], [2, 1, 0]])
    metrics = SegmentationMetrics(3)
    metrics.update(target.clone(), target)
    result = metrics.compute()
    assert result['miou'] == result['macc'] == result['aacc'] == 100.0
    assert result['iou'] == result['acc'] == [100.0, 100.0, 100.0]


def test_known_confusion_gives_known_miou_macc_and_aacc():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    prediction = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0])
    metrics = SegmentationMetrics(3)
    metrics.update(prediction.view(2, 1, 4), target.view(2, 1, 4))  # leading dims are flattened
    assert metrics.confusion.tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 1]]
    result = metrics.compute()
    assert result['iou'] == pytest.approx([60.0, 100 / 3, 100 / 3])  # TP / (GT + predicted - TP)
    assert result['acc'] == pytest.approx([75.0, 50.0, 50.0])  # TP / GT
    assert result['miou'] == pytest.approx((60 + 200 / 3) / 3)
    assert result['macc'] == pytest.approx(175 / 3)
    assert result['aacc'] == pytest.approx(62.5)


def test_ignored_pixels_are_not_counted_and_updates_accumulate():
    metrics = SegmentationMetrics(2)
    metrics.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 255, 1, 255]))
    metrics.update(torch.tensor([1]), torch.tensor([0]))
    assert metrics.confusion.tolist() == [[1, 1], [0, 1]]
    assert metrics.compute()['aacc'] == pytest.approx(200 / 3)


def test_absent_classes_are_nan_and_left_out_of_the_means():
    metrics = SegmentationMetrics(4)
    metrics.update(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 0, 1]))
    result = metrics.compute()
    # class 2 is predicted but absent: IoU 0, accuracy nan; class 3 is neither: both nan
    assert result['iou'][:3] == pytest.approx([200 / 3, 0.0, 0.0]) and math.isnan(result['iou'][3])
    assert result['acc'][:2] == pytest.approx([200 / 3, 0.0])
    assert math.isnan(result['acc'][2]) and math.isnan(result['acc'][3])
    assert result['miou'] == pytest.approx(200 / 9)
    assert result['macc'] == pytest.approx(100 / 3)
    assert result['aacc'] == pytest.approx(50.0)
    assert math.isnan(SegmentationMetrics(3).compute()['miou'])


def test_metrics_reject_mismatched_shapes_scores_and_labels_out_of_range():
    metrics = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r"prediction of shape \(2, 4\) and target of shape \(2, 3\) differ"):
        metrics.update(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must hold integer class indices; pass logits.argmax\(1\)"):
        metrics.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels outside 0..2: prediction and scored target span 0..3"):
        metrics.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    assert metrics.confusion.sum() == 0
