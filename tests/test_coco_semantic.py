"""COCO semantic maps (COCO-stuff layout, digit scenes) and Swin Transformer's 3x resize-then-crop augmentation."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from deformvit.data import DatasetError
from deformvit.data import coco
from deformvit.data.coco import CocoDetection, coco_semantic_dir, collate_detection
from deformvit.data.common import keep_ratio_size
from deformvit.data.scenes import write_digit_scenes
from test_coco_data import _coco_dict, _rectangle_mask, _write

# pycocotools' RLE decoding predates numpy 2's __array__(copy=) protocol
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

CAT_MASK = _rectangle_mask(48, 64, top=6, left=8, bottom=26, right=28)  # image 1's cat polygon, rasterised
DOG_MASK = _rectangle_mask(48, 64, top=20, left=30, bottom=40, right=60)  # image 1's dog RLE


def _semantic_of_image_1():
    """Image 1's map: cat pixels 3, dog pixels 7 (their COCO ids), an unlabelled top row, background 0."""
    semantic = np.zeros((48, 64), np.uint8)
    semantic[CAT_MASK == 1] = 3
    semantic[DOG_MASK == 1] = 7
    semantic[0] = 255
    return semantic


def _semantic_maps():
    """``{file_name: (H, W) uint8 map}`` for the three images of ``_coco_dict``."""
    return {
        'a.png': _semantic_of_image_1(),
        'sub/b.png': np.random.default_rng(2).integers(0, 256, (60, 80), dtype=np.uint8),
        'c.png': np.full((40, 40), 255, np.uint8),
    }


def _save_maps(folder, maps):
    for file_name, semantic in maps.items():
        path = folder / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(semantic).save(path)


@pytest.fixture
def semantic_files(tmp_path):
    """``CocoDetection`` keywords ``images_dir``, ``annotation_file``, ``semantic_dir``: ``_coco_dict`` with
    the maps of ``_semantic_maps``."""
    images_dir, annotation_file = _write(tmp_path, _coco_dict())
    semantic_dir = tmp_path / 'stuffthingmaps' / 'val2017'
    _save_maps(semantic_dir, _semantic_maps())
    return dict(images_dir=images_dir, annotation_file=annotation_file, semantic_dir=semantic_dir)


def _upscaled_by_2(array):
    """Nearest-neighbour upscaling of the last two axes by exactly 2."""
    return array.repeat(2, axis=-2).repeat(2, axis=-1)


def _scripted_draws(monkeypatch, values):
    """Make the crop's integer draws return ``values`` in turn; returns the list of (low, high) asked."""
    asked, remaining = [], list(values)

    def scripted(low, high):
        asked.append((low, high))
        value = remaining.pop(0)
        assert low <= value <= high, f'scripted draw {value} outside [{low}, {high}]'
        return value
    monkeypatch.setattr(coco, 'random_int', scripted)
    return asked


# ---- semantic maps -------------------------------------------------------------------------------

def test_semantic_maps_load_as_int64_class_indices_with_255_unlabelled(semantic_files):
    ds = CocoDetection(**semantic_files, with_masks=True)
    maps = _semantic_maps()
    for index, file_name in enumerate(['a.png', 'sub/b.png', 'c.png']):
        image, target = ds[index]
        assert target['semantic'].dtype == torch.int64
        assert target['semantic'].shape == image.shape[-2:]
        assert torch.equal(target['semantic'], torch.from_numpy(maps[file_name]).long())
    assert 'semantic' not in CocoDetection(semantic_files['images_dir'], semantic_files['annotation_file'])[0][1]


def test_semantic_map_is_flipped_with_the_image(semantic_files):
    plain = CocoDetection(**semantic_files, with_masks=True)
    flipped = CocoDetection(**semantic_files, train=True, with_masks=True, hflip=1.0)
    for index in range(len(flipped)):
        image, target = plain[index]
        flipped_image, flipped_target = flipped[index]
        assert torch.equal(flipped_image, image.flip(-1))
        assert torch.equal(flipped_target['semantic'], target['semantic'].flip(-1))
        assert torch.equal(flipped_target['masks'], target['masks'].flip(-1))
    _, target = flipped[0]
    for mask, label in zip(target['masks'], target['labels'].tolist()):
        assert (target['semantic'][mask.bool()] == plain.category_ids[label - 1]).all()


def test_missing_semantic_folder_is_refused(semantic_files, tmp_path):
    images_dir, annotation_file = semantic_files['images_dir'], semantic_files['annotation_file']
    with pytest.raises(DatasetError, match=r"semantic map folder .*nowhere' does not exist; expected a folder "
                                           r"of single-channel PNG class-index maps"):
        CocoDetection(images_dir, annotation_file, semantic_dir=tmp_path / 'nowhere')


def test_images_without_their_semantic_map_are_refused_naming_them(semantic_files):
    images_dir, annotation_file, semantic_dir = semantic_files.values()
    (semantic_dir / 'sub' / 'b.png').unlink()
    (semantic_dir / 'c.png').unlink()
    with pytest.raises(DatasetError, match=r"2 of the 3 images of .* have no semantic map in .*: sub/b\.png, "
                                           r"c\.png; expected a PNG per image named like its file_name"):
        CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir)
    # only the kept images need a map: training leaves out image 3 (c.png), which has no annotation
    _save_maps(semantic_dir, {'sub/b.png': _semantic_maps()['sub/b.png']})
    ds = CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir, train=True)
    assert ds.ids == [1, 2]


def test_semantic_map_of_another_size_raises_naming_both_sizes(semantic_files):
    images_dir, annotation_file, semantic_dir = semantic_files.values()
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(semantic_dir / 'a.png')  # transposed
    ds = CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir)
    with pytest.raises(DatasetError, match=r"semantic map .*a\.png' is 48x64 \(width x height\) but its image "
                                           r".*a\.png' is 64x48"):
        ds[0]


@pytest.mark.parametrize('content', [b'', b'this is not a PNG'])
def test_unreadable_semantic_map_gives_none_and_collate_skips_it(semantic_files, content):
    images_dir, annotation_file, semantic_dir = semantic_files.values()
    (semantic_dir / 'a.png').write_bytes(content)
    ds = CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir)
    assert ds[0] is None
    images, targets, skipped = collate_detection([ds[index] for index in range(len(ds))])
    assert skipped == 1 and [target['image_id'] for target in targets] == [2, 3] and len(images) == 2


def test_truncated_semantic_map_gives_none(semantic_files):
    images_dir, annotation_file, semantic_dir = semantic_files.values()
    path = semantic_dir / 'sub' / 'b.png'
    path.write_bytes(path.read_bytes()[:200])
    assert CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir)[1] is None


def test_palette_semantic_map_is_read_as_its_indices(semantic_files):
    images_dir, annotation_file, semantic_dir = semantic_files.values()
    indices = _semantic_of_image_1()
    palette_map = Image.fromarray(indices, mode='P')
    palette_map.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    palette_map.save(semantic_dir / 'a.png')
    with Image.open(semantic_dir / 'a.png') as saved:
        assert saved.mode == 'P'
    _, target = CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir)[0]
    assert torch.equal(target['semantic'], torch.from_numpy(indices).long())


def test_colour_semantic_map_is_refused(semantic_files):
    images_dir, annotation_file, semantic_dir = semantic_files.values()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(semantic_dir / 'a.png')
    ds = CocoDetection(images_dir, annotation_file, semantic_dir=semantic_dir)
    with pytest.raises(DatasetError, match=r"semantic map .*a\.png' is a mode RGB image of shape \(48, 64, 3\); "
                                           r"expected a single-channel PNG of class indices"):
        ds[0]


def test_coco_semantic_dir_follows_the_images_folder_of_the_split(tmp_path):
    _write(tmp_path, _coco_dict(), split='train2017')
    _write(tmp_path, _coco_dict(), split='val')
    assert coco_semantic_dir(tmp_path, 'train') is None
    assert coco_semantic_dir(tmp_path, 'val') is None
    (tmp_path / 'stuffthingmaps' / 'train2017').mkdir(parents=True)
    (tmp_path / 'stuffthingmaps' / 'val2017').mkdir()  # not the folder of the val images
    assert coco_semantic_dir(str(tmp_path), 'train') == str(tmp_path / 'stuffthingmaps' / 'train2017')
    assert coco_semantic_dir(tmp_path, 'val') is None
    (tmp_path / 'stuffthingmaps' / 'val').mkdir()
    assert coco_semantic_dir(tmp_path, 'val') == str(tmp_path / 'stuffthingmaps' / 'val')
    with pytest.raises(ValueError, match='are not COCO splits'):
        coco_semantic_dir(tmp_path, 'validation')


def test_digit_scenes_write_a_semantic_map_per_image_labelling_its_digits(tmp_path):
    paths = write_digit_scenes(tmp_path / 'digits', n_train=6, n_val=3)
    for split, ade_split, count in (('train', 'training', 6), ('val', 'validation', 3)):
        semantic_dir = coco_semantic_dir(paths['coco'], split)
        assert semantic_dir == os.path.join(paths['coco'], 'stuffthingmaps', split)
        assert sorted(os.listdir(semantic_dir)) == sorted(os.listdir(os.path.join(paths['coco'], split)))
        assert len(os.listdir(semantic_dir)) == count
        annotation_file = os.path.join(paths['coco'], 'annotations', f'instances_{split}.json')
        ground_truth = COCO(annotation_file)
        for image_id, image in ground_truth.imgs.items():
            with Image.open(os.path.join(semantic_dir, image['file_name'])) as file:
                assert file.mode == 'L'
                semantic = np.asarray(file)
            with Image.open(os.path.join(paths['ade'], 'annotations', ade_split, image['file_name'])) as file:
                ade_label = np.asarray(file)
            assert set(np.unique(semantic)) <= set(range(11)) | {255}
            expected = np.zeros_like(semantic)
            for annotation in ground_truth.imgToAnns[image_id]:
                expected[ground_truth.annToMask(annotation) == 1] = annotation['category_id']
            labelled = (semantic != 0) & (semantic != 255)
            assert np.array_equal(np.where(labelled, semantic, 0), expected)
            assert np.array_equal(semantic == 255, ade_label == 0)  # the rim the ADE annotations ignore
            assert (semantic == 255).any()
        ds = CocoDetection(os.path.join(paths['coco'], split), annotation_file, with_masks=True,
                           semantic_dir=semantic_dir)
        _, target = ds[0]
        for mask, label in zip(target['masks'], target['labels'].tolist()):
            assert (target['semantic'][mask.bool()] == ds.category_ids[label - 1]).all()


# ---- resize-then-crop ----------------------------------------------------------------------------

def test_crop_matches_the_hand_computed_resize_and_crop(semantic_files, monkeypatch):
    plain_image, plain_target = CocoDetection(**semantic_files)[0]
    ds = CocoDetection(**semantic_files, train=True, with_masks=True, hflip=0.0, crop=1.0, crop_sizes=(96, 200),
                       crop_range=(32, 80))
    # 64x48 -> short side 96: factor 2, 128x96; a 70 wide, 50 high crop at left 40, top 30
    asked = _scripted_draws(monkeypatch, [0, 50, 70, 30, 40])
    image, target = ds[0]
    assert asked == [(0, 1), (32, 80), (32, 80), (0, 46), (0, 58)]
    resized = torch.nn.functional.interpolate(plain_image[None], size=(96, 128), mode='bilinear',
                                              align_corners=False)[0]
    torch.testing.assert_close(image, resized[:, 30:80, 40:110])
    # cat [8, 6, 28, 26] -> [16, 12, 56, 52] -> [-24, -18, 16, 22] -> clipped [0, 0, 16, 22]
    # dog [30, 20, 60, 40] -> [60, 40, 120, 80] -> [20, 10, 80, 50] -> clipped [20, 10, 70, 50]
    assert target['boxes'].dtype == torch.float32
    assert target['boxes'].tolist() == [[0, 0, 16, 22], [20, 10, 70, 50]]
    assert target['labels'].tolist() == plain_target['labels'].tolist() == [1, 3]
    # areas 400 and 600, times 2 x 2, times the part of the box kept: 352 / 1600 and 2000 / 2400
    assert target['area'].tolist() == [352, 2000] and target['area'].dtype == torch.float32
    assert target['iscrowd'].tolist() == [0, 0] and target['image_id'] == 1
    expected_masks = _upscaled_by_2(np.stack([CAT_MASK, DOG_MASK]))[:, 30:80, 40:110]
    assert target['masks'].dtype == torch.uint8
    assert torch.equal(target['masks'], torch.from_numpy(expected_masks))
    assert torch.equal(target['masks'][0], torch.from_numpy(_rectangle_mask(50, 70, 0, 0, 22, 16)))
    expected_semantic = _upscaled_by_2(_semantic_of_image_1())[30:80, 40:110]
    assert torch.equal(target['semantic'], torch.from_numpy(expected_semantic).long())


def test_flip_comes_after_the_crop(semantic_files, monkeypatch):
    ds = CocoDetection(**semantic_files, train=True, with_masks=True, hflip=1.0, crop=1.0, crop_sizes=(96,),
                       crop_range=(32, 80))
    _scripted_draws(monkeypatch, [0, 50, 70, 30, 40])
    image, target = ds[0]
    _scripted_draws(monkeypatch, [0, 50, 70, 30, 40])
    ds.hflip = 0.0
    unflipped_image, unflipped_target = ds[0]
    assert image.shape == (3, 50, 70)
    assert torch.equal(image, unflipped_image.flip(-1))
    assert target['boxes'].tolist() == [[54, 0, 70, 22], [0, 10, 50, 50]]
    assert torch.equal(target['masks'], unflipped_target['masks'].flip(-1))
    assert torch.equal(target['semantic'], unflipped_target['semantic'].flip(-1))


def test_crop_keeping_no_box_gives_empty_well_shaped_targets(semantic_files, monkeypatch):
    ds = CocoDetection(**semantic_files, train=True, with_masks=True, hflip=0.0, crop=1.0, crop_sizes=(96,),
                       crop_range=(32, 80))
    _scripted_draws(monkeypatch, [0, 32, 32, 0, 96])  # the top right corner: neither cat nor dog
    image, target = ds[0]
    assert image.shape == (3, 32, 32)
    assert target['boxes'].shape == (0, 4) and target['boxes'].dtype == torch.float32
    assert target['labels'].shape == (0,) and target['labels'].dtype == torch.int64
    assert target['area'].shape == (0,) and target['iscrowd'].shape == (0,)
    assert target['masks'].shape == (0, 32, 32) and target['masks'].dtype == torch.uint8
    expected_semantic = _upscaled_by_2(_semantic_of_image_1())[0:32, 96:128]
    assert torch.equal(target['semantic'], torch.from_numpy(expected_semantic).long())
    images, targets, skipped = collate_detection([(image, target)])
    assert skipped == 0 and targets[0]['boxes'].shape == (0, 4)


def test_random_crops_stay_in_range_and_keep_boxes_masks_and_semantic_consistent(tmp_path):
    images_dir, annotation_file = _write(tmp_path, _coco_dict())
    plain = CocoDetection(images_dir, annotation_file, with_masks=True, skip_empty=False)
    semantic_dir = tmp_path / 'stuffthingmaps' / 'val2017'
    for index, image_id in enumerate(plain.ids):  # each instance's pixels hold its COCO category id
        _, target = plain[index]
        semantic = np.zeros(target['masks'].shape[1:], np.uint8)
        for mask, label in zip(target['masks'].numpy(), target['labels'].tolist()):
            semantic[mask == 1] = plain.category_ids[label - 1]
        _save_maps(semantic_dir, {plain.coco.imgs[image_id]['file_name']: semantic})
    ds = CocoDetection(images_dir, annotation_file, train=True, with_masks=True, semantic_dir=semantic_dir,
                       crop=1.0, crop_sizes=(40, 50, 60), crop_range=(24, 48), crop_max_size=100)
    torch.manual_seed(0)
    sizes, n_kept = set(), 0
    for _ in range(20):
        for index in range(len(ds)):
            image, target = ds[index]
            height, width = image.shape[-2:]
            sizes.add((height, width))
            assert 24 <= height <= 48 and 24 <= width <= 48
            assert target['semantic'].shape == (height, width) and target['masks'].shape[1:] == (height, width)
            n_boxes = len(target['boxes'])
            assert target['labels'].shape == target['area'].shape == target['iscrowd'].shape == (n_boxes,)
            assert target['masks'].shape[0] == n_boxes and (target['area'] > 0).all()
            boxes = target['boxes']
            assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
            assert (boxes[:, 2:] - boxes[:, :2] >= coco.MIN_BOX_SIDE).all()
            for mask, box, label in zip(target['masks'], boxes.tolist(), target['labels'].tolist()):
                rows, columns = torch.nonzero(mask, as_tuple=True)
                assert (columns >= box[0] - 1).all() and (columns < box[2] + 1).all()
                assert (rows >= box[1] - 1).all() and (rows < box[3] + 1).all()
                assert (target['semantic'][mask.bool()] == ds.category_ids[label - 1]).all()
            n_kept += n_boxes
    assert len(sizes) > 10 and n_kept > 0


def test_crop_keeps_aspect_and_caps_the_long_side():
    assert keep_ratio_size(48, 64, (96, 1333)) == (96, 128)
    assert keep_ratio_size(100, 1000, (600, 1333)) == (133, 1333)  # min(600 / 100, 1333 / 1000)
    assert keep_ratio_size(480, 640, (500, 1333)) == (500, 667)


def test_without_crop_the_samples_and_random_draws_are_unchanged(semantic_files):
    plain = CocoDetection(**semantic_files, with_masks=True)  # evaluation: no random draw
    ds = CocoDetection(**semantic_files, with_masks=True, train=True, skip_empty=False, hflip=0.5, crop=0.0)
    torch.manual_seed(5)
    expected_flips = [torch.rand(()).item() < 0.5 for _ in range(12)]
    torch.manual_seed(5)
    for step in range(12):
        image, target = ds[step % 3]
        plain_image, plain_target = plain[step % 3]
        if expected_flips[step]:  # one draw per sample: the flip's
            plain_image = plain_image.flip(-1)
            width = plain_image.shape[-1]
            boxes = plain_target['boxes']
            plain_target = dict(plain_target, masks=plain_target['masks'].flip(-1),
                                semantic=plain_target['semantic'].flip(-1),
                                boxes=torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                                                  dim=1))
        assert torch.equal(image, plain_image)
        assert target.keys() == plain_target.keys()
        for key, value in plain_target.items():
            assert torch.equal(torch.as_tensor(target[key]), torch.as_tensor(value)), key


def test_crop_is_for_training_only(semantic_files):
    image, target = CocoDetection(**semantic_files, crop=1.0, crop_sizes=(96,), crop_range=(32, 32))[0]
    assert image.shape == (3, 48, 64) and target['semantic'].shape == (48, 64)


@pytest.mark.parametrize('arguments, message', [
    (dict(crop=1.5), r'crop 1.5 is outside \[0, 1\]'),
    (dict(crop=-0.1), r'crop -0.1 is outside \[0, 1\]'),
    (dict(crop_sizes=()), r'crop_sizes \(\) is not a non-empty list of positive integers'),
    (dict(crop_sizes=(400, 0)), r'crop_sizes \(400, 0\) is not'),
    (dict(crop_sizes=(400.5,)), r'crop_sizes \(400.5,\) is not'),
    (dict(crop_range=(600, 384)), r'crop_range \(600, 384\) is not two positive integers \(smallest, largest\)'),
    (dict(crop_range=(384,)), r'crop_range \(384,\) is not two'),
    (dict(crop_range=(0, 600)), r'crop_range \(0, 600\) is not two'),
    (dict(crop_max_size=0), r'crop_max_size 0 is not a positive integer'),
    (dict(crop_max_size=True), r'crop_max_size True is not a positive integer'),
])
def test_bad_crop_arguments_raise(semantic_files, arguments, message):
    with pytest.raises(ValueError, match=message):
        CocoDetection(**semantic_files, train=True, **arguments)
