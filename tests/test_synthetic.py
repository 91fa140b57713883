"""Digit scenes: COCO and ADE20K layouts of the same MNIST scenes, deterministic and cached."""
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from deformvit.data import DigitsDataset
from deformvit.data import scenes as synthetic
from deformvit.data.scenes import ADE_CLASSES, default_scenes_root, write_digit_scenes

# pycocotools' RLE decoding predates numpy 2's __array__(copy=) protocol
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

SMALL = dict(n_train=20, n_val=8)
SPLITS = (('train', 'training'), ('val', 'validation'))
LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    """``(root, paths)`` of one small generation with the default scene parameters."""
    root = tmp_path_factory.mktemp('scenes') / 'digits'
    return root, write_digit_scenes(root, **SMALL)


def _tree_bytes(root) -> dict:
    """Relative path -> bytes of every file below ``root``."""
    root = Path(root)
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob('*'))
            if path.is_file()}


def _load_split(paths, coco_split, ade_split):
    """``[(image, label_map, annotations)]`` of a split, with the COCO object."""
    coco = COCO(os.path.join(paths['coco'], 'annotations', f'instances_{coco_split}.json'))
    scenes = []
    for image_id, image in sorted(coco.imgs.items()):
        label_map = np.asarray(Image.open(os.path.join(paths['ade'], 'annotations', ade_split, image['file_name'])))
        scenes.append((image, label_map, coco.imgToAnns[image_id]))
    return coco, scenes


def _distance_to(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (chessboard distance) of ``mask``."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    near = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            near |= padded[dy:dy + height, dx:dx + width]
    return near


def test_writes_both_layouts_and_returns_their_roots(scenes):
    root, paths = scenes
    assert paths == {'coco': str(root / 'coco'), 'ade': str(root / 'ade')}
    assert (root / 'ade' / 'classes.txt').read_text().splitlines() == ADE_CLASSES
    assert ADE_CLASSES == ['background', 'digit']
    for coco_split, ade_split in SPLITS:
        n = SMALL[f'n_{coco_split}']
        coco_images = sorted(os.listdir(root / 'coco' / coco_split))
        assert len(coco_images) == n
        assert sorted(os.listdir(root / 'ade' / 'images' / ade_split)) == coco_images
        assert sorted(os.listdir(root / 'ade' / 'annotations' / ade_split)) == coco_images
        for name in coco_images:
            assert ((root / 'coco' / coco_split / name).read_bytes()
                    == (root / 'ade' / 'images' / ade_split / name).read_bytes())
            with Image.open(root / 'ade' / 'annotations' / ade_split / name) as label_map:
                assert label_map.mode == 'L' and label_map.size == (128, 128)
            with Image.open(root / 'coco' / coco_split / name) as image:
                assert image.mode == 'RGB' and image.size == (128, 128)


def test_coco_json_is_standard_instances_format_read_by_pycocotools(scenes):
    _, paths = scenes
    for coco_split, ade_split in SPLITS:
        coco, split_scenes = _load_split(paths, coco_split, ade_split)
        assert set(coco.dataset) == {'info', 'images', 'categories', 'annotations'}
        assert coco.loadCats(coco.getCatIds()) == [
            dict(id=digit + 1, name=str(digit), supercategory='digit') for digit in range(10)]
        assert len(coco.imgs) == SMALL[f'n_{coco_split}']
        for image, _, annotations in split_scenes:
            assert (image['width'], image['height']) == (128, 128)
            assert os.path.isfile(os.path.join(paths['coco'], coco_split, image['file_name']))
            assert 1 <= len(annotations) <= 4
            for annotation in annotations:
                assert annotation['iscrowd'] == 0
                assert all(isinstance(value, float) for value in annotation['bbox'])
                assert isinstance(annotation['segmentation']['counts'], str)
                assert annotation['area'] == coco.annToMask(annotation).sum()
        assert len({annotation['id'] for annotation in coco.dataset['annotations']}) == len(coco.anns)


def test_every_coco_mask_is_exactly_the_ade_pixels_of_its_digit(scenes):
    _, paths = scenes
    for coco_split, ade_split in SPLITS:
        coco, split_scenes = _load_split(paths, coco_split, ade_split)
        for _, label_map, annotations in split_scenes:
            assert set(np.unique(label_map)) <= set(range(len(ADE_CLASSES) + 1))
            class_masks = np.zeros((10,) + label_map.shape, bool)
            covered = np.zeros(label_map.shape, int)
            for annotation in annotations:
                mask = coco.annToMask(annotation).astype(bool)
                class_masks[annotation['category_id'] - 1] |= mask
                covered += mask
            assert covered.max() <= 1  # digits never overlap
            np.testing.assert_array_equal(label_map == 2, class_masks.any(0))


def test_boxes_are_tight_around_masks(scenes):
    _, paths = scenes
    for coco_split, ade_split in SPLITS:
        coco, _ = _load_split(paths, coco_split, ade_split)
        for annotation in coco.dataset['annotations']:
            rows, cols = np.nonzero(coco.annToMask(annotation))
            x, y, width, height = annotation['bbox']
            assert (x, y) == (cols.min(), rows.min())
            assert (x + width - 1, y + height - 1) == (cols.max(), rows.max())
            np.testing.assert_array_equal(mask_utils.toBbox(annotation['segmentation']), annotation['bbox'])


def test_train_and_val_scenes_show_disjoint_real_digits_of_their_split(scenes):
    _, paths = scenes
    sources = {}
    for coco_split, ade_split in SPLITS:
        coco, _ = _load_split(paths, coco_split, ade_split)
        digits = DigitsDataset(coco_split)
        label_of = dict(zip(digits.indices.tolist(), digits.targets))
        sources[coco_split] = {annotation['mnist_index'] for annotation in coco.dataset['annotations']}
        for annotation in coco.dataset['annotations']:
            assert label_of[annotation['mnist_index']] == annotation['category_id'] - 1
    assert sources['train'] and sources['val']
    assert not sources['train'] & sources['val']


def test_digits_appear_at_several_scales(scenes):
    _, paths = scenes
    coco, _ = _load_split(paths, 'train', 'training')
    heights = np.array([annotation['bbox'][3] for annotation in coco.dataset['annotations']])
    # a digit fills about 20 of MNIST's 28 rows: sides 14..56 give mask heights of about 10..40
    assert heights.min() < 16 and heights.max() > 34
    assert len(np.unique(np.digitize(heights, [16, 22, 28, 34]))) == 5


def test_ignore_pixels_lie_only_at_digit_edges(scenes):
    _, paths = scenes
    largest = 56
    for coco_split, ade_split in SPLITS:
        coco, split_scenes = _load_split(paths, coco_split, ade_split)
        n_ignored = n_near_mask = 0
        for _, label_map, annotations in split_scenes:
            ignored = label_map == 0
            masks = [coco.annToMask(annotation).astype(bool) for annotation in annotations]
            digit_pixels = np.any(masks, axis=0)
            assert not (ignored & digit_pixels).any()
            n_ignored += ignored.sum()
            n_near_mask += (ignored & _distance_to(digit_pixels, 2)).sum()
            for mask in masks:  # every digit has an anti-aliased rim
                assert (ignored & _distance_to(mask, 1)).any()
            # faint strokes may reach further, but never beyond the digit's square
            for row, col in zip(*np.nonzero(ignored)):
                assert any(max(max(x + width, col + 1) - min(x, col), max(y + height, row + 1) - min(y, row))
                           <= largest for x, y, width, height in (a['bbox'] for a in annotations))
        assert n_near_mask >= 0.95 * n_ignored > 0


def test_digits_contrast_with_their_background(scenes):
    root, paths = scenes
    coco, split_scenes = _load_split(paths, 'train', 'training')
    for image, label_map, annotations in split_scenes:
        luminance = np.asarray(Image.open(root / 'coco' / 'train' / image['file_name'])) / 255.0 @ LUMA
        for annotation in annotations:
            mask = coco.annToMask(annotation).astype(bool)
            surround = _distance_to(mask, 3) & (label_map == 1)
            assert abs(luminance[mask].mean() - luminance[surround].mean()) > 0.15


def test_same_seed_gives_identical_files_and_another_seed_different_scenes(tmp_path, scenes):
    root, _ = scenes
    write_digit_scenes(tmp_path / 'again', **SMALL)
    assert _tree_bytes(tmp_path / 'again') == _tree_bytes(root)
    write_digit_scenes(tmp_path / 'other', seed=1, **SMALL)
    other = _tree_bytes(tmp_path / 'other')
    assert other['coco/train/000001.png'] != _tree_bytes(root)['coco/train/000001.png']
    assert json.loads(other['.complete.json'])['seed'] == 1


def test_second_call_with_same_parameters_returns_without_rewriting(scenes, monkeypatch):
    root, paths = scenes
    before = _tree_bytes(root)
    stamp_time = os.stat(root / '.complete.json').st_mtime_ns

    def fail(*args):
        raise AssertionError('scenes were regenerated')
    monkeypatch.setattr(synthetic, '_write_scenes', fail)
    assert write_digit_scenes(str(root), **SMALL) == paths
    assert os.stat(root / '.complete.json').st_mtime_ns == stamp_time
    assert _tree_bytes(root) == before


def test_other_parameters_on_a_generated_root_raise_naming_the_difference(scenes):
    root, _ = scenes
    with pytest.raises(ValueError, match=r'n_val 8 there vs 9 asked, seed 0 there vs 3 asked\)'
                                         r'; pick another root or delete'):
        write_digit_scenes(root, n_train=20, n_val=9, seed=3)


def test_root_holding_other_files_is_refused(tmp_path):
    (tmp_path / 'notes.txt').write_text('not digit scenes')
    with pytest.raises(ValueError, match='not a digit-scenes folder'):
        write_digit_scenes(tmp_path, **SMALL)
    assert os.listdir(tmp_path) == ['notes.txt']


def test_existing_empty_root_is_filled(tmp_path):
    root = tmp_path / 'digits'
    root.mkdir()
    write_digit_scenes(root, n_train=2, n_val=1)
    assert len(os.listdir(root / 'ade' / 'annotations' / 'validation')) == 1


@pytest.mark.parametrize('arguments, message', [
    (dict(digit_sizes=(14, 200)), r'digit_sizes=\(14, 200\) with size=128'),
    (dict(digit_sizes=(4, 20)), r'digit_sizes=\(4, 20\)'),
    (dict(n_val=0), 'n_val=0'),
    (dict(max_digits=0), 'max_digits=0'),
])
def test_out_of_range_parameters_raise(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_digit_scenes(tmp_path / 'digits', **arguments)
    assert not os.listdir(tmp_path)


def test_interrupted_run_leaves_no_root_and_is_cleaned_up_by_the_next(tmp_path, scenes, monkeypatch):
    root = tmp_path / 'digits'
    compose_scene = synthetic._compose_scene
    calls = []

    def interrupted(*args):
        calls.append(None)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return compose_scene(*args)
    monkeypatch.setattr(synthetic, '_compose_scene', interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_digit_scenes(root, **SMALL)
    partial = Path(synthetic._partial_folder(str(root)))
    assert not root.exists() and partial.is_dir()
    (partial / 'stale.txt').write_text('left over')

    monkeypatch.setattr(synthetic, '_compose_scene', compose_scene)
    write_digit_scenes(root, **SMALL)
    assert not partial.exists()
    assert _tree_bytes(root) == _tree_bytes(scenes[0])


def test_concurrent_calls_generate_once(tmp_path, monkeypatch):
    write_scenes = synthetic._write_scenes
    generations, errors = [], []

    def counted(*args):
        generations.append(None)
        write_scenes(*args)
    monkeypatch.setattr(synthetic, '_write_scenes', counted)

    def call():
        try:
            write_digit_scenes(tmp_path / 'digits', n_train=3, n_val=2)
        except Exception as error:
            errors.append(error)
    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(generations) == 1
    assert len(os.listdir(tmp_path / 'digits' / 'coco' / 'train')) == 3


def test_default_root_is_a_per_user_cache_that_deformvit_cache_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv('DEFORMVIT_CACHE', raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))
    assert default_scenes_root() == os.path.join(str(tmp_path), '.cache', 'deformvit', 'digit-scenes-v3')
    monkeypatch.setenv('DEFORMVIT_CACHE', str(tmp_path / 'cache'))
    assert default_scenes_root() == os.path.join(str(tmp_path / 'cache'), 'digit-scenes-v3')
