"""Datasets: the image-folder reader, corrupt-file skipping, image reading and the embedded MNIST digits."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from deformvit.data import DatasetError, DigitsDataset, ImageFolderDataset, collate_skipping_corrupt, iter_images
from deformvit.data.images import read_image

TO_TENSOR_32 = v2.Compose([v2.ToImage(), v2.Resize((32, 32)), v2.ToDtype(torch.float32, scale=True)])


def _save_image(path, size=(20, 14), seed=0, format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)
    return path


def _jpeg_bytes(size=(64, 64), seed=0):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """``tmp/root/{cat,dog,eel}``: 5 readable images in PNG, JPEG (any case, nested) and GIF."""
    root = tmp_path / 'root'
    _save_image(root / 'dog' / 'a.png', seed=1)
    _save_image(root / 'dog' / 'nested' / 'b.JPG', seed=2, format='JPEG')
    _save_image(root / 'cat' / 'c.jpeg', seed=3)
    _save_image(root / 'eel' / 'd.gif', seed=4)
    _save_image(root / 'eel' / 'e.png', seed=5)
    (root / 'eel' / 'notes.txt').write_text('not an image extension: ignored')
    return root


@pytest.fixture
def tree_with_corrupt_files(image_tree):
    """``image_tree`` plus a zero-byte JPEG, a text file named .png and a half-cut JPEG."""
    (image_tree / 'cat' / 'empty.jpg').write_bytes(b'')
    (image_tree / 'dog' / 'text.png').write_text('this is not a PNG')
    jpeg = _jpeg_bytes()
    (image_tree / 'eel' / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    return image_tree


def test_image_folder_indexes_sorted_classes_and_finds_nested_images_of_any_case(image_tree):
    ds = ImageFolderDataset(str(image_tree))
    assert ds.classes == ['cat', 'dog', 'eel']
    assert ds.class_to_idx == {'cat': 0, 'dog': 1, 'eel': 2}
    relative = [(Path(path).relative_to(image_tree).as_posix(), target) for path, target in ds.samples]
    assert relative == [('cat/c.jpeg', 0), ('dog/a.png', 1), ('dog/nested/b.JPG', 1),
                        ('eel/d.gif', 2), ('eel/e.png', 2)]
    assert ds.targets == [0, 1, 1, 2, 2] and len(ds) == 5


def test_image_folder_applies_the_transform_to_an_rgb_image(image_tree):
    ds = ImageFolderDataset(image_tree, transform=TO_TENSOR_32)
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
        assert target == ds.targets[index]
    raw, _ = ImageFolderDataset(image_tree)[0]
    assert isinstance(raw, Image.Image) and raw.mode == 'RGB' and raw.size == (20, 14)


def test_given_classes_fix_the_index_order(image_tree):
    ds = ImageFolderDataset(image_tree, classes=['eel', 'cat', 'dog'])
    assert ds.class_to_idx == {'eel': 0, 'cat': 1, 'dog': 2}
    assert ds.targets == [0, 0, 1, 2, 2]


def test_each_corrupt_file_reads_as_none_instead_of_raising(tree_with_corrupt_files, capsys):
    ds = ImageFolderDataset(tree_with_corrupt_files, transform=TO_TENSOR_32)
    corrupt = {Path(path).name for index, (path, _) in enumerate(ds.samples) if ds[index] is None}
    assert corrupt == {'empty.jpg', 'text.png', 'truncated.jpg'}
    assert capsys.readouterr() == ('', '')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_loader_skips_and_counts_the_three_corrupt_files_and_delivers_every_good_image(
        tree_with_corrupt_files, num_workers):
    ds = ImageFolderDataset(tree_with_corrupt_files, transform=TO_TENSOR_32)
    assert len(ds) == 8
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skipping_corrupt, num_workers=num_workers)
    skipped, targets, n_images = 0, [], 0
    for images, batch_targets, batch_skipped in loader:
        skipped += batch_skipped
        if images is not None:
            assert images.shape[1:] == (3, 32, 32) and images.shape[0] == batch_targets.shape[0]
            n_images += images.shape[0]
            targets += batch_targets.tolist()
    assert skipped == 3
    assert n_images == 5 and sorted(targets) == [0, 1, 1, 2, 2]


def test_unreadable_images_come_back_with_their_reason_and_a_bomb_is_one_of_them(tree_with_corrupt_files, bomb_png):
    bomb = bomb_png(tree_with_corrupt_files / 'dog' / 'bomb.png')
    read = {Path(path).name: (image, reason) for path, image, reason in iter_images([str(tree_with_corrupt_files)])}
    assert read['bomb.png'][0] is None
    assert read['bomb.png'][1].startswith('too large to decode (Image size (3600000000 pixels) exceeds limit')
    assert read['text.png'][0] is None and read['text.png'][1].startswith('not a readable image (cannot identify')
    assert read['truncated.jpg'][1].startswith('not a readable image (image file is truncated')
    assert all(image.mode == 'RGB' and reason is None for name, (image, reason) in read.items()
               if name not in ('bomb.png', 'text.png', 'truncated.jpg', 'empty.jpg'))
    with pytest.raises(ValueError) as error:  # the reader of demo and visualize: one line, not PIL's exception
        read_image(str(bomb))
    assert type(error.value) is ValueError and '\n' not in str(error.value)
    assert str(error.value).startswith(f'{bomb} is too large to decode (Image size (3600000000 pixels)')
    assert 'downscale it' in str(error.value)


def test_a_file_named_twice_or_by_its_folder_is_listed_once(image_tree):
    cat = str(image_tree / 'cat' / 'c.jpeg')
    again = str(image_tree / 'cat' / '.' / 'c.jpeg')
    assert [path for path, _, _ in iter_images([str(image_tree / 'cat'), cat, again])] == [cat]


def test_collate_of_an_all_corrupt_batch_returns_none_and_the_count():
    assert collate_skipping_corrupt([None, None]) == (None, None, 2)
    images, targets, skipped = collate_skipping_corrupt([None, (torch.ones(3, 2, 2), 4)])
    assert images.shape == (1, 3, 2, 2) and targets.tolist() == [4] and skipped == 1


def test_missing_root_is_rejected_before_training(tmp_path):
    with pytest.raises(DatasetError, match=r'nowhere.*does not exist.*one sub-folder'):
        ImageFolderDataset(tmp_path / 'nowhere')
    file = tmp_path / 'file.png'
    file.write_bytes(b'')
    with pytest.raises(DatasetError, match='is not a directory'):
        ImageFolderDataset(file)


def test_root_without_class_folders_is_rejected(tmp_path):
    _save_image(tmp_path / 'loose.png')
    (tmp_path / '.hidden').mkdir()
    with pytest.raises(DatasetError, match='has no class folders'):
        ImageFolderDataset(tmp_path)


def test_class_folders_without_images_are_named(image_tree):
    (image_tree / 'fox').mkdir()
    (image_tree / 'gnu' / 'sub').mkdir(parents=True)
    (image_tree / 'gnu' / 'sub' / 'readme.txt').write_text('no images here')
    with pytest.raises(DatasetError, match=r"2 class folder\(s\) .* hold no images: 'fox', 'gnu'"):
        ImageFolderDataset(image_tree)


def test_many_empty_class_folders_are_listed_five_at_most(tmp_path):
    for name in 'abcdefg':
        (tmp_path / name).mkdir()
    with pytest.raises(DatasetError, match="'a', 'b', 'c', 'd', 'e' and 2 more"):
        ImageFolderDataset(tmp_path)


def test_classes_that_differ_from_the_folders_are_named(image_tree):
    with pytest.raises(DatasetError, match=r"missing class folders 'ant'.*extra class folders 'eel'"):
        ImageFolderDataset(image_tree, classes=['ant', 'cat', 'dog'])
    with pytest.raises(DatasetError, match="classes listed twice 'cat'"):
        ImageFolderDataset(image_tree, classes=['cat', 'cat', 'dog', 'eel'])


@pytest.fixture(scope='module')
def digits():
    return DigitsDataset('train'), DigitsDataset('val')


def test_digits_split_5000_images_into_4000_train_and_1000_val(digits):
    train, val = digits
    assert len(train) + len(val) == 5000
    assert len(val) == 1000 and len(train) == 4000


def test_digits_splits_are_disjoint_and_stratified(digits):
    train, val = digits
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert np.bincount(train.targets, minlength=10).tolist() == [400] * 10
    assert np.bincount(val.targets, minlength=10).tolist() == [100] * 10
    assert train.classes == [str(d) for d in range(10)]


def test_digits_split_is_deterministic_per_seed(digits):
    train, _ = digits
    again = DigitsDataset('train', seed=0)
    assert again.targets[:50] == train.targets[:50]
    assert np.array_equal(np.asarray(again[0][0]), np.asarray(train[0][0]))
    assert DigitsDataset('train', seed=1).targets[:50] != train.targets[:50]


def test_digits_split_mixes_classes_rather_than_listing_them_in_order(digits):
    train, _ = digits
    assert len(set(train.targets[:20])) > 3


def test_digits_are_rgb_28x28_images_with_identical_channels(digits):
    train, val = digits
    for ds in (train, val):
        image, target = ds[0]
        assert isinstance(image, Image.Image) and image.mode == 'RGB' and image.size == (28, 28)
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
        assert pixels.max() > 200 and pixels.min() == 0  # a real digit: white strokes on black
        assert target == ds.targets[0]


def test_digits_transform_gives_tensors_for_a_loader():
    ds = DigitsDataset('val', transform=TO_TENSOR_32)
    images, targets = next(iter(DataLoader(ds, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and targets.tolist() == ds.targets[:8]


def test_digits_reject_unknown_split_and_bad_fraction():
    with pytest.raises(ValueError, match=r"unknown split 'test'; expected 'train' or 'val'"):
        DigitsDataset('test')
    with pytest.raises(ValueError, match=r'val_fraction 1.5 is outside \[0, 1\]'):
        DigitsDataset('val', val_fraction=1.5)
