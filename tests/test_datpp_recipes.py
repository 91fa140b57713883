"""The DAT++ dense-prediction recipes against the official configs (LeapLabTHU/DAT-Detection, DAT-Segmentation).

Each official config is a row: its global batch (GPUs x images per GPU), learning rate, drop path and schedule;
the recipe resolved with ``--backbone datpp_*`` must give the same values (docs/datpp.md, "DAT++ recipes").
"""
import argparse

import pytest
import torch

from deformvit.cli.train import add_training_arguments
from deformvit.tasks import get_task
from deformvit.training import check_config, load_recipe, recipe_names, resolve_config
from deformvit.training.loop import _scheduler

# detection: 4 nodes x 8 GPUs x 2 images (cmrcn_base: 8 nodes x 8 GPUs x 1 image), both 64 images
DET_BATCH = 64
# (official config, recipe, backbone, drop path, lr at the official global batch, global batch)
OFFICIAL = [
    ('mrcn_tiny_1x_4n_dp00_lr4', 'datpp-det-1x', 'datpp_tiny', 0.0, 4e-4, DET_BATCH),
    ('mrcn_small_1x_4n_dp01_lr4', 'datpp-det-1x', 'datpp_small', 0.1, 4e-4, DET_BATCH),
    ('mrcn_tiny_3x_4n_dp03_lr4', 'det-3x', 'datpp_tiny', 0.3, 4e-4, DET_BATCH),
    ('mrcn_small_3x_4n_dp05_lr4', 'det-3x', 'datpp_small', 0.5, 4e-4, DET_BATCH),
    ('cmrcn_tiny_1x_4n_dp00_lr4', 'det-cascade-1x', 'datpp_tiny', 0.0, 4e-4, DET_BATCH),
    ('cmrcn_tiny_3x_4n_dp01_lr4', 'det-cascade-3x', 'datpp_tiny', 0.1, 4e-4, DET_BATCH),
    ('cmrcn_small_3x_4n_dp05_lr4', 'det-cascade-3x', 'datpp_small', 0.5, 4e-4, DET_BATCH),
    ('cmrcn_base_3x_8n_dp08_lr4', 'det-cascade-3x', 'datpp_base', 0.8, 4e-4, DET_BATCH),
    ('rtn_tiny_1x_4n_dp00_lr2', 'datpp-retinanet-1x', 'datpp_tiny', 0.0, 2e-4, DET_BATCH),
    ('rtn_small_1x_4n_dp01_lr2', 'datpp-retinanet-1x', 'datpp_small', 0.1, 2e-4, DET_BATCH),
    ('rtn_tiny_3x_4n_dp02_lr2', 'datpp-retinanet-3x', 'datpp_tiny', 0.2, 2e-4, DET_BATCH),
    ('rtn_small_3x_4n_dp05_lr2', 'datpp-retinanet-3x', 'datpp_small', 0.5, 2e-4, DET_BATCH),
    # segmentation: Semantic FPN on 8 GPUs x 4 images, UperNet on 8 GPUs x 2 images
    ('fpn_tiny_80k_dp04_lr2', 'datpp-seg-fpn-40k', 'datpp_tiny', 0.4, 2e-4, 32),
    ('fpn_small_160k_dp04_lr2', 'datpp-seg-fpn-40k', 'datpp_small', 0.4, 2e-4, 32),
    ('fpn_base_160k_dp07_lr2', 'datpp-seg-fpn-40k', 'datpp_base', 0.7, 2e-4, 32),
    ('upn_tiny_160k_dp03_lr6', 'seg-upernet-160k', 'datpp_tiny', 0.3, 6e-5, 16),
    ('upn_small_160k_dp05_lr6', 'seg-upernet-160k', 'datpp_small', 0.5, 6e-5, 16),
    ('upn_base_160k_dp07_lr6', 'seg-upernet-160k', 'datpp_base', 0.7, 6e-5, 16),
]
NEW = ('datpp-det-1x', 'datpp-retinanet-1x', 'datpp-retinanet-3x', 'datpp-seg-fpn-40k')
MULTI_SCALE = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]


def resolve(recipe, *args):
    task = get_task(load_recipe(recipe)['task'])
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, task)
    config = resolve_config(parser.parse_args(['--recipe', recipe, *args]), task)
    check_config(config, task)
    return config


def lr_at(config, global_batch):
    return config['lr_base'] * global_batch / config['lr_base_size']  # the loop's linear scaling


def test_the_new_recipes_are_shipped_and_default_to_datpp_tiny():
    assert set(NEW) <= set(recipe_names())
    assert {'datpp-det-1x', 'datpp-retinanet-1x', 'datpp-retinanet-3x'} <= set(recipe_names('detect'))
    assert 'datpp-seg-fpn-40k' in recipe_names('segment')
    for name in NEW:
        assert resolve(name)['backbone'] == 'datpp_tiny'


@pytest.mark.parametrize('official, recipe, backbone, drop_path, lr, batch', OFFICIAL, ids=[r[0] for r in OFFICIAL])
def test_each_official_config_resolves_to_its_drop_path_and_learning_rate(
        official, recipe, backbone, drop_path, lr, batch):
    config = resolve(recipe, '--backbone', backbone)
    assert config['drop_path'] == pytest.approx(drop_path)
    assert lr_at(config, batch) == pytest.approx(lr)


def test_detection_recipes_follow_the_official_schedules():
    for recipe, detector, epochs, steps, lr in [('datpp-det-1x', 'mask_rcnn', 12, [8, 11], 4e-4),
                                                ('datpp-retinanet-1x', 'retinanet', 12, [8, 11], 2e-4),
                                                ('datpp-retinanet-3x', 'retinanet', 36, [27, 33], 2e-4),
                                                ('det-3x', 'mask_rcnn', 36, [27, 33], 4e-4),
                                                ('det-cascade-1x', 'cascade_mask_rcnn', 12, [8, 11], 4e-4),
                                                ('det-cascade-3x', 'cascade_mask_rcnn', 36, [27, 33], 4e-4)]:
        config = resolve(recipe, '--backbone', 'datpp_tiny')
        assert (config['detector'], config['epochs'], config['decay_epochs'], config['decay_rate']) == \
            (detector, epochs, steps, 0.1), recipe
        assert (config['opt'], config['weight_decay'], config['warmup_updates']) == ('adamw', 0.05, 500), recipe
        assert (config['min_size'], config['max_size'], config['crop'], config['hflip']) == \
            (MULTI_SCALE, 1333, 0.5, 0.5), recipe  # AutoAugment: 480-800, or resize-and-crop, one each
        assert lr_at(config, DET_BATCH) == pytest.approx(lr), recipe
    for recipe, ratio in [('datpp-det-1x', 1e-3), ('datpp-retinanet-1x', 1e-3), ('datpp-retinanet-3x', 1e-3)]:
        config = resolve(recipe)  # warmup_ratio=0.001 of the official rate at the official batch
        assert config['warmup_lr'] == pytest.approx(ratio * lr_at(config, DET_BATCH)), recipe


def test_semantic_fpn_recipe_follows_the_official_80k_over_2_schedule():
    config = resolve('datpp-seg-fpn-40k', '--backbone', 'datpp_tiny')
    assert (config['decoder'], config['iterations'], config['sched'], config['poly_power'], config['min_lr']) == \
        ('semantic_fpn', 80000 // 2, 'poly', 0.9, 0.0)
    assert (config['weight_decay'], config['warmup_updates'], config['aux_weight']) == (1e-4, 0, 0.0)
    assert config['batch_size'] * 8 == 32  # samples_per_gpu=4 (configs/_base_/datasets/ade20k.py), 8 GPUs
    assert lr_at(config, 16) == pytest.approx(1e-4)  # mmsegmentation's 1e-4 at 4 GPUs x 4 images
    assert (config['crop_size'], config['scale'], config['ratio_range'], config['hflip'], config['photometric']) == \
        ([512, 512], [2048, 512], [0.5, 2.0], 0.5, True)
    # the schedule itself: no warm-up, (1 - t / T) ** 0.9 from the first update
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr_at(config, 32))
    scheduler = _scheduler(optimizer, config, updates_per_epoch=632)
    for t in (0, 20000, 39999):
        scheduler.step_update(t)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(2e-4 * (1 - t / 40000) ** 0.9)


def test_upernet_recipe_is_the_official_upn_schedule():
    config = resolve('seg-upernet-160k', '--backbone', 'datpp_small')
    assert (config['iterations'], config['poly_power'], config['warmup_updates'], config['weight_decay']) == \
        (160000, 1.0, 1500, 0.01)
    assert config['warmup_lr'] == pytest.approx(1e-6 * lr_at(config, 16))  # warmup_ratio=1e-6
    assert (config['aux_weight'], config['batch_size'] * 8) == (0.4, 16)
