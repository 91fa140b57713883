"""COCO detection data: layout, validation, targets, flips, corrupt files and COCOeval scoring."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch.utils.data import DataLoader

from deformvit.data import DatasetError
from deformvit.data.coco import (CocoDetection, coco_evaluate, coco_layout, collate_detection,
                                  to_coco_results)


def _rectangle_mask(height, width, top, left, bottom, right):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def _compressed_rle(mask):
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}


def _uncompressed_rle(mask):
    """Run lengths of the column-major pixels, starting with a run of zeros."""
    pixels = mask.flatten(order='F')
    change = np.flatnonzero(np.diff(pixels)) + 1
    bounds = np.concatenate([[0], change, [pixels.size]])
    counts = np.diff(bounds).tolist()
    if pixels[0] == 1:
        counts = [0] + counts
    return {'size': list(mask.shape), 'counts': counts}


DOG_MASK = _rectangle_mask(48, 64, top=20, left=30, bottom=40, right=60)  # image 1, 30x20 box at (30, 20)
EEL_MASK = _rectangle_mask(60, 80, top=30, left=50, bottom=42, right=58)  # image 2, 8x12 box at (50, 30)
CROWD_MASK = _rectangle_mask(48, 64, top=0, left=0, bottom=10, right=10)


def _coco_dict():
    """Three images, categories with ids 7, 3, 5 (listed out of order) and every segmentation kind.

    Image 1 (64x48): a cat polygon square, a dog compressed RLE and a crowd. Image 2 (80x60, in a
    sub-folder): an eel triangle polygon, an eel uncompressed RLE, a dog whose box sticks out of
    the image and a cat box 0.5 px wide. Image 3 (40x40): nothing.
    """
    return {
        'images': [
            {'id': 1, 'file_name': 'a.png', 'width': 64, 'height': 48},
            {'id': 2, 'file_name': 'sub/b.png', 'width': 80, 'height': 60},
            {'id': 3, 'file_name': 'c.png', 'width': 40, 'height': 40},
        ],
        'categories': [{'id': 7, 'name': 'dog'}, {'id': 3, 'name': 'cat'}, {'id': 5, 'name': 'eel'}],
        'annotations': [
            {'id': 10, 'image_id': 1, 'category_id': 3, 'bbox': [8, 6, 20, 20], 'area': 400, 'iscrowd': 0,
             'segmentation': [[8, 6, 28, 6, 28, 26, 8, 26]]},
            {'id': 11, 'image_id': 1, 'category_id': 7, 'bbox': [30, 20, 30, 20], 'area': 600, 'iscrowd': 0,
             'segmentation': _compressed_rle(DOG_MASK)},
            {'id': 12, 'image_id': 1, 'category_id': 3, 'bbox': [0, 0, 10, 10], 'area': 100, 'iscrowd': 1,
             'segmentation': _compressed_rle(CROWD_MASK)},
            {'id': 20, 'image_id': 2, 'category_id': 5, 'bbox': [10, 10, 30, 30], 'area': 450, 'iscrowd': 0,
             'segmentation': [[10, 10, 40, 10, 10, 40]]},
            {'id': 21, 'image_id': 2, 'category_id': 5, 'bbox': [50, 30, 8, 12], 'area': 96, 'iscrowd': 0,
             'segmentation': _uncompressed_rle(EEL_MASK)},
            {'id': 22, 'image_id': 2, 'category_id': 7, 'bbox': [60, 45, 30, 30], 'area': 300, 'iscrowd': 0,
             'segmentation': [[60, 45, 80, 45, 80, 60, 60, 60]]},
            {'id': 23, 'image_id': 2, 'category_id': 3, 'bbox': [5, 5, 0.5, 10], 'area': 5, 'iscrowd': 0,
             'segmentation': [[5, 5, 5.5, 5, 5.5, 15, 5, 15]]},
        ],
    }


def _clean_coco_dict():
    """``_coco_dict`` without the clipped and the degenerate box, plus a category 9 with no objects."""
    data = _coco_dict()
    data['annotations'] = [ann for ann in data['annotations'] if ann['id'] not in (22, 23)]
    data['categories'].append({'id': 9, 'name': 'fox'})
    return data


def _pixels(width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(root, data, split='val2017'):
    """Write ``data``'s images (random PNGs of the JSON's size) and ``annotations/instances_<split>.json``."""
    images_dir = root / split
    for image in data['images']:
        path = images_dir / image['file_name']
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(image['width'], image['height'], seed=image['id'])).save(path)
    annotation_file = root / 'annotations' / f'instances_{split}.json'
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return images_dir, annotation_file


@pytest.fixture
def coco_files(tmp_path):
    return _write(tmp_path, _coco_dict())


def _mask_box(mask):
    """``[x1, y1, x2, y2]`` pixel-edge box around the nonzero pixels of an ``(H, W)`` mask."""
    rows, columns = torch.nonzero(mask, as_tuple=True)
    return [columns.min().item(), rows.min().item(), columns.max().item() + 1, rows.max().item() + 1]


# ---- layout --------------------------------------------------------------------------------------

def test_layout_prefers_2017_split_names_and_falls_back_to_plain_ones(tmp_path):
    _write(tmp_path, _coco_dict(), split='train2017')
    _write(tmp_path, _coco_dict(), split='train')
    _write(tmp_path, _coco_dict(), split='val')
    layout = coco_layout(str(tmp_path))
    assert layout == {
        'train': (str(tmp_path / 'train2017'), str(tmp_path / 'annotations' / 'instances_train2017.json')),
        'val': (str(tmp_path / 'val'), str(tmp_path / 'annotations' / 'instances_val.json')),
    }


def test_layout_lists_what_it_looked_for_when_a_split_is_missing(tmp_path):
    _write(tmp_path, _coco_dict(), split='train2017')
    (tmp_path / 'val2017').mkdir()  # images without their annotation file do not make a split
    with pytest.raises(DatasetError, match=r'lacks the split\(s\) val \(looked for val2017/ with '
                                           r'annotations/instances_val2017.json or val/ with '
                                           r'annotations/instances_val.json\)'):
        coco_layout(tmp_path)


def test_evaluation_needs_only_the_val_split(tmp_path):
    _write(tmp_path, _coco_dict(), split='val')
    val = (str(tmp_path / 'val'), str(tmp_path / 'annotations' / 'instances_val.json'))
    assert coco_layout(tmp_path, splits=('val',)) == {'val': val}
    with pytest.raises(DatasetError, match=r'lacks the split\(s\) train \(looked for train2017/'):
        coco_layout(tmp_path)  # training needs both
    with pytest.raises(ValueError, match=r"splits \('validation',\) are not COCO splits; expected one or more of "
                                         r"'train', 'val'"):
        coco_layout(tmp_path, splits=('validation',))


# ---- targets -------------------------------------------------------------------------------------

def test_categories_sorted_by_id_give_contiguous_labels_after_background(coco_files):
    ds = CocoDetection(*coco_files)
    assert ds.classes == ['cat', 'eel', 'dog'] and ds.category_ids == [3, 5, 7]
    assert ds.ids == [1, 2, 3] and len(ds) == 3
    _, target = ds[0]
    assert target['labels'].tolist() == [1, 3]  # cat (id 3) -> 1, dog (id 7) -> 3; the crowd is no target


def test_targets_hold_clipped_xyxy_boxes_and_the_image_as_float_rgb(coco_files):
    ds = CocoDetection(*coco_files)
    image, target = ds[1]
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32
    expected_pixels = torch.from_numpy(_pixels(80, 60, seed=2)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image, expected_pixels)
    assert target['boxes'].dtype == torch.float32 and target['labels'].dtype == torch.int64
    assert target['boxes'].tolist() == [[10, 10, 40, 40], [50, 30, 58, 42], [60, 45, 80, 60]]
    assert target['labels'].tolist() == [2, 2, 3]
    assert target['image_id'] == 2 and isinstance(target['image_id'], int)
    assert target['area'].tolist() == [450, 96, 300] and target['area'].dtype == torch.float32
    assert target['iscrowd'].tolist() == [0, 0, 0] and target['iscrowd'].dtype == torch.int64
    assert 'masks' not in target
    _, empty = ds[2]
    assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,)


def test_masks_decode_polygons_compressed_and_uncompressed_rle(coco_files):
    ds = CocoDetection(*coco_files, with_masks=True)
    _, first = ds[0]
    masks = first['masks']
    assert masks.shape == (2, 48, 64) and masks.dtype == torch.uint8
    assert torch.equal(masks[0], torch.from_numpy(_rectangle_mask(48, 64, top=6, left=8, bottom=26, right=28)))
    assert torch.equal(masks[1], torch.from_numpy(DOG_MASK))
    _, second = ds[1]
    triangle, eel, clipped = second['masks']
    assert abs(triangle.sum().item() - 450) < 30  # the 30x30 right triangle, rasterised
    rows, columns = torch.nonzero(triangle, as_tuple=True)
    assert (rows >= 10).all() and (columns >= 10).all() and (rows + columns <= 50).all()
    assert torch.equal(eel, torch.from_numpy(EEL_MASK))
    assert _mask_box(clipped) == [60, 45, 80, 60]
    _, empty = ds[2]
    assert empty['masks'].shape == (0, 40, 40)


def test_training_skips_images_without_targets_and_counts_every_skip(coco_files):
    ds = CocoDetection(*coco_files, train=True)
    assert ds.ids == [1, 2]
    assert ds.skipped == {'no_annotations': 1, 'crowd': 1, 'invalid_boxes': 1, 'no_segmentation': 0}
    assert ds.summary() == ('instances_val2017.json: 2 images, 5 boxes, 3 classes; skipped 1 images without '
                            'usable annotations, 1 crowd annotations, 1 boxes under 1 px after clipping')
    kept = CocoDetection(*coco_files, train=True, skip_empty=False)
    assert kept.ids == [1, 2, 3] and kept.skipped['no_annotations'] == 0


def test_annotations_without_segmentation_are_skipped_only_for_masks(tmp_path):
    data = _coco_dict()
    del data['annotations'][0]['segmentation']
    files = _write(tmp_path, data)
    assert CocoDetection(*files).skipped['no_segmentation'] == 0
    with_masks = CocoDetection(*files, with_masks=True)
    assert with_masks.skipped['no_segmentation'] == 1
    assert with_masks[0][1]['labels'].tolist() == [3]


def test_coco_index_is_built_quietly_from_the_parsed_file(coco_files, capsys):
    ds = CocoDetection(*coco_files)
    assert capsys.readouterr().out == ''
    assert sorted(ds.coco.getImgIds()) == [1, 2, 3] and len(ds.coco.getAnnIds()) == 7
    assert ds.coco.anns[12]['iscrowd'] == 1


# ---- horizontal flip -----------------------------------------------------------------------------

def test_hflip_mirrors_image_boxes_and_masks_together(coco_files):
    plain = CocoDetection(*coco_files, with_masks=True)
    flipped = CocoDetection(*coco_files, train=True, with_masks=True, hflip=1.0)
    for index in range(len(flipped)):
        image, target = plain[index]
        flipped_image, flipped_target = flipped[index]
        width = image.shape[-1]
        assert torch.equal(flipped_image, image.flip(-1))
        x1, y1, x2, y2 = target['boxes'].unbind(1)
        assert torch.equal(flipped_target['boxes'], torch.stack([width - x2, y1, width - x1, y2], dim=1))
        assert torch.equal(flipped_target['masks'], target['masks'].flip(-1))
        for mask, box in zip(flipped_target['masks'], flipped_target['boxes'].tolist()):
            mask_box = _mask_box(mask)
            assert all(abs(a - b) <= 1 for a, b in zip(mask_box, box)), (mask_box, box)
        assert flipped_target['labels'].tolist() == target['labels'].tolist()


def test_hflip_draws_from_the_seeded_torch_rng_and_never_flips_for_evaluation(coco_files):
    plain_image, _ = CocoDetection(*coco_files)[0]
    ds = CocoDetection(*coco_files, train=True, hflip=0.5)

    def flips():
        return [not torch.equal(ds[0][0], plain_image) for _ in range(16)]

    torch.manual_seed(1)
    first = flips()
    torch.manual_seed(1)
    assert flips() == first
    assert any(first) and not all(first)
    evaluation = CocoDetection(*coco_files, hflip=1.0)
    assert torch.equal(evaluation[0][0], plain_image)


# ---- unreadable files ----------------------------------------------------------------------------

def test_corrupt_image_gives_none_and_collate_drops_and_counts_it(coco_files):
    images_dir, annotation_file = coco_files
    (images_dir / 'a.png').write_text('this is not a PNG')
    ds = CocoDetection(images_dir, annotation_file)
    assert ds[0] is None
    images, targets, skipped = collate_detection([ds[0], ds[1], ds[2]])
    assert skipped == 1 and [target['image_id'] for target in targets] == [2, 3]
    assert [tuple(image.shape) for image in images] == [(3, 60, 80), (3, 40, 40)]
    assert collate_detection([None, None]) == (None, None, 2)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_detection))
    assert len(batches) == 1 and batches[0][2] == 1


def test_image_size_differing_from_the_json_is_an_error(coco_files):
    images_dir, annotation_file = coco_files
    Image.fromarray(_pixels(48, 64, seed=0)).save(images_dir / 'a.png')  # transposed: 48 wide, 64 high
    ds = CocoDetection(images_dir, annotation_file)
    with pytest.raises(DatasetError, match=r"a\.png' is 48x64 \(width x height\) but .* gives 64x48"):
        ds[0]


# ---- validation errors ---------------------------------------------------------------------------

def test_missing_folder_or_annotation_file_is_an_error(coco_files, tmp_path):
    images_dir, annotation_file = coco_files
    with pytest.raises(DatasetError, match=r"images folder .*nowhere' does not exist"):
        CocoDetection(tmp_path / 'nowhere', annotation_file)
    with pytest.raises(DatasetError, match=r"annotation file .*missing\.json' does not exist"):
        CocoDetection(images_dir, tmp_path / 'missing.json')


def test_json_that_does_not_parse_is_an_error_quoting_the_parser(coco_files):
    images_dir, annotation_file = coco_files
    annotation_file.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r'is not valid JSON \(Expecting value: line 1 column 13'):
        CocoDetection(images_dir, annotation_file)


def test_missing_top_level_keys_are_an_error(coco_files):
    images_dir, annotation_file = coco_files
    annotation_file.write_text(json.dumps({'images': [], 'annotations': []}))
    with pytest.raises(DatasetError, match=r"lacks the top-level list\(s\) 'categories' \(found keys: "
                                           r"'annotations', 'images'\)"):
        CocoDetection(images_dir, annotation_file)
    annotation_file.write_text('[]')
    with pytest.raises(DatasetError, match=r"'images', 'annotations', 'categories' \(found keys: none\)"):
        CocoDetection(images_dir, annotation_file)


def _error_for(tmp_path, edit, **kwargs):
    """The DatasetError message of a dataset whose JSON ``edit`` changed after writing the images."""
    data = _coco_dict()
    images_dir, annotation_file = _write(tmp_path, data)
    edit(data)
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        CocoDetection(images_dir, annotation_file, **kwargs)
    return str(error.value)


def test_duplicate_image_ids_are_an_error(tmp_path):
    message = _error_for(tmp_path, lambda data: data['images'].append(dict(data['images'][0])))
    assert '1 duplicate image id(s)' in message and '1 (2 times)' in message


def test_duplicate_category_ids_are_an_error(tmp_path):
    message = _error_for(tmp_path, lambda data: data['categories'].append({'id': 3, 'name': 'kitten'}))
    assert '1 duplicate category id(s)' in message and '3 (2 times)' in message


def test_annotations_of_unknown_images_are_an_error(tmp_path):
    def edit(data):
        for ann in data['annotations'][:2]:
            ann['image_id'] = 99
    message = _error_for(tmp_path, edit)
    assert '2 annotation(s)' in message and 'refer to images that are not in "images"' in message
    assert 'annotation 10 -> image_id 99, annotation 11 -> image_id 99' in message


def test_category_ids_outside_the_categories_are_labels_outside_the_class_range(tmp_path):
    def edit(data):
        data['annotations'][3]['category_id'] = 4
    message = _error_for(tmp_path, edit)
    assert 'labels outside the class range: annotation 20 -> category_id 4' in message
    assert 'among the categories (3, 5, 7)' in message


def test_image_files_missing_from_the_folder_are_an_error(tmp_path):
    data = _coco_dict()
    images_dir, annotation_file = _write(tmp_path, data)
    (images_dir / 'sub' / 'b.png').unlink()
    with pytest.raises(DatasetError, match=r"1 of the 3 image files named in .* are not in .*: sub/b\.png"):
        CocoDetection(images_dir, annotation_file)


def test_malformed_records_are_an_error_listing_them(tmp_path):
    def edit(data):
        data['annotations'][0]['bbox'] = [1, 2]
        del data['images'][2]['file_name']
    message = _error_for(tmp_path, edit)
    assert "2 malformed record(s)" in message
    assert "image #2 lacks 'file_name'" in message and 'annotation 10 has bbox [1, 2]' in message


def test_nan_and_infinite_box_coordinates_are_malformed_records_named_by_annotation(tmp_path):
    def edit(data):
        data['annotations'][0]['bbox'] = [math.nan, 6, 20, 20]
        data['annotations'][1]['bbox'] = [30, 20, math.inf, 20]
        data['annotations'][3]['bbox'] = [10, -math.inf, 30, 30]
    message = _error_for(tmp_path, edit)  # json writes NaN / Infinity, which Python's reader takes back
    assert '3 malformed record(s)' in message
    assert ('annotation 10 has bbox [nan, 6, 20, 20], annotation 11 has bbox [30, 20, inf, 20], '
            'annotation 20 has bbox [10, -inf, 30, 30]') in message
    assert 'four finite numbers (no NaN or Infinity)' in message


def test_rle_sized_for_another_image_is_an_error(tmp_path):
    def edit(data):
        data['annotations'][1]['segmentation'] = _compressed_rle(EEL_MASK)
    message = _error_for(tmp_path, edit)
    assert 'annotation 11 has RLE size [60, 80] on image 1 of height x width [48, 64]' in message


def test_no_image_left_is_an_error(tmp_path):
    def edit(data):
        for ann in data['annotations']:
            ann['iscrowd'] = 1
    message = _error_for(tmp_path, edit, train=True)
    assert 'no images left' in message and '3 images without usable annotations, 7 crowd annotations' in message
    assert 'pass skip_empty=False' in message


def test_flip_probability_outside_0_1_is_an_error(coco_files):
    with pytest.raises(ValueError, match=r'hflip 1.5 is outside \[0, 1\]'):
        CocoDetection(*coco_files, hflip=1.5)


# ---- results and evaluation ----------------------------------------------------------------------

@pytest.fixture
def clean_dataset(tmp_path):
    return CocoDetection(*_write(tmp_path, _clean_coco_dict()), with_masks=True)


def _ground_truth_results(ds, shift=0.0, image_ids=None):
    results = []
    for index, image_id in enumerate(ds.ids):
        if image_ids is not None and image_id not in image_ids:
            continue
        _, target = ds[index]
        prediction = {'boxes': target['boxes'] + shift, 'labels': target['labels'],
                      'scores': torch.linspace(0.9, 0.5, len(target['labels'])),
                      'masks': target['masks'][:, None].float()}
        results.extend(to_coco_results(image_id, prediction, ds.category_ids))
    return results


def test_to_coco_results_maps_labels_back_to_category_ids_and_boxes_to_xywh(clean_dataset):
    prediction = {'boxes': torch.tensor([[8.0, 6.0, 28.0, 26.0], [30.0, 20.0, 60.0, 40.0]]),
                  'labels': torch.tensor([1, 3]), 'scores': torch.tensor([0.75, 0.5]),
                  'masks': torch.stack([torch.zeros(1, 48, 64), torch.from_numpy(DOG_MASK)[None] * 0.9])}
    results = to_coco_results(1, prediction, clean_dataset.category_ids)
    assert [(entry['category_id'], entry['bbox'], entry['score']) for entry in results] == [
        (3, [8.0, 6.0, 20.0, 20.0], 0.75), (7, [30.0, 20.0, 30.0, 20.0], 0.5)]
    assert all(type(value) is float for entry in results for value in entry['bbox'])
    assert isinstance(results[1]['segmentation']['counts'], str)
    assert np.array_equal(coco_mask.decode(results[1]['segmentation']), DOG_MASK)
    assert coco_mask.decode(results[0]['segmentation']).sum() == 0
    json.dumps(results)
    with pytest.raises(ValueError, match=r'labels 0 outside 1\.\.4'):
        to_coco_results(1, dict(prediction, labels=torch.tensor([0, 1])), clean_dataset.category_ids)


def test_ground_truth_fed_back_scores_100_box_and_mask_ap(clean_dataset, capsys):
    masks_before = clean_dataset[0][1]['masks']
    results = _ground_truth_results(clean_dataset)
    metrics = coco_evaluate(clean_dataset.coco, results, iou_types=('bbox', 'segm'))
    assert capsys.readouterr().out == ''
    assert torch.equal(clean_dataset[0][1]['masks'], masks_before)  # COCOeval turns polygons into RLE in place
    for prefix in ('box', 'mask'):
        assert metrics[f'{prefix}_ap'] == pytest.approx(100.0)
        assert metrics[f'{prefix}_ap50'] == pytest.approx(100.0)
        assert metrics[f'{prefix}_ap75'] == pytest.approx(100.0)
        assert metrics[f'{prefix}_aps'] == pytest.approx(100.0)  # every object here is under 32x32 px
        assert math.isnan(metrics[f'{prefix}_apl'])  # no large objects to score
    per_class = metrics['box_ap_per_class']
    assert per_class[:3] == pytest.approx([100.0, 100.0, 100.0]) and math.isnan(per_class[3])  # fox: no objects
    assert results[0]['category_id'] == 3  # the caller's results are left as they were
    assert set(results[0]) == {'image_id', 'category_id', 'bbox', 'score', 'segmentation'}


def test_shifted_boxes_score_lower_box_ap(clean_dataset):
    metrics = coco_evaluate(clean_dataset.coco, _ground_truth_results(clean_dataset, shift=1.0))
    assert metrics['box_ap50'] == pytest.approx(100.0)  # every shifted box still overlaps its object
    assert metrics['box_ap'] < 80.0
    assert 'mask_ap' not in metrics


def test_empty_results_score_zero_not_a_crash(clean_dataset):
    metrics = coco_evaluate(clean_dataset.coco, [], iou_types=('bbox', 'segm'))
    for prefix in ('box', 'mask'):
        assert metrics[f'{prefix}_ap'] == 0.0 and metrics[f'{prefix}_ap50'] == 0.0
        assert metrics[f'{prefix}_ap_per_class'][:3] == [0.0, 0.0, 0.0]


def test_image_ids_restrict_the_evaluation_to_those_images(clean_dataset):
    results = _ground_truth_results(clean_dataset, image_ids={1})
    assert coco_evaluate(clean_dataset.coco, results)['box_ap'] < 100.0  # image 2's objects missed
    restricted = coco_evaluate(clean_dataset.coco, results, image_ids=[1])
    assert restricted['box_ap'] == pytest.approx(100.0)
    assert math.isnan(restricted['box_ap_per_class'][1])  # eels live only on image 2


def test_evaluation_rejects_foreign_images_and_missing_masks(clean_dataset):
    results = _ground_truth_results(clean_dataset)
    foreign = copy.deepcopy(results[:1])
    foreign[0]['image_id'] = 99
    with pytest.raises(ValueError, match=r'results name 1 image id\(s\) not in the ground truth: 99'):
        coco_evaluate(clean_dataset.coco, foreign)
    with pytest.raises(ValueError, match=r'image_ids has 1 id\(s\) not in the ground truth: 42'):
        coco_evaluate(clean_dataset.coco, results, image_ids=[1, 42])
    boxes_only = [{key: value for key, value in entry.items() if key != 'segmentation'} for entry in results]
    with pytest.raises(ValueError, match=r"lack 'segmentation'"):
        coco_evaluate(clean_dataset.coco, boxes_only, iou_types=('segm',))
    with pytest.raises(ValueError, match=r"unknown IoU type\(s\) keypoints"):
        coco_evaluate(clean_dataset.coco, results, iou_types=('keypoints',))
