"""ATSS (EAPT Table IV): the adaptive assignment on hand-made anchors, mmdetection's head and losses,
training and evaluation on any backbone and size, bfloat16 autocast, options, and the table's sizes."""
import math

import pytest
import torch
import torch.nn as nn
from torchvision.ops import generalized_box_iou_loss

from deformvit.errors import UsageError
from deformvit.tasks.detection.assigners import atss_assign
from deformvit.tasks.detection.atss import ATSSDetector, centerness_targets, group_count
from deformvit.tools.complexity import count_parameters

SMALL = dict(min_size=128, max_size=128, fpn_channels=32)
LN2 = math.log(2.0)


def _model(backbone: str = 'dat_nano', **kwargs) -> ATSSDetector:
    torch.manual_seed(0)
    return ATSSDetector.build(backbone, 3, **dict(SMALL, **kwargs))


def _targets(count: int) -> list:
    return [dict(boxes=torch.tensor([[10.0 + i, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                 labels=torch.tensor([1, 2])) for i in range(count)]


def _pyramid(height: int = 128, width: int = 128, channels: int = 32, dtype=torch.float32) -> list:
    """Stand-ins for P3-P7 of a padded ``height`` x ``width`` batch (P6 and P7 by stride-2 convolutions)."""
    sizes = [(height // s, width // s) for s in (8, 16, 32)]
    sizes += [((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2)]
    sizes += [((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2)]
    return [torch.zeros(1, channels, h, w, dtype=dtype) for h, w in sizes]


# ---- the assignment (ATSS Algorithm 1) ---------------------------------------------------------

def test_threshold_is_the_mean_plus_the_unbiased_std_of_the_candidates_ious():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # 10x10 anchors shifted right by 0, 1, 3 (centres inside the box) and three far away
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [3.0, 0.0, 13.0, 10.0],
                            [20.0, 0.0, 30.0, 10.0], [30.0, 0.0, 40.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    ious = [1.0, 9 / 11, 7 / 13, 0.0, 0.0, 0.0]  # overlap (10 - s) x 10 over union (10 + s) x 10
    mean = sum(ious) / 6  # 0.3928
    threshold = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 5)  # 0.3928 + 0.4547 = 0.8475
    assert ious[1] < threshold < ious[0]
    assert ious[1] > mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 6)  # the biased std (0.8079) would take it
    assert atss_assign(anchors, [6], gt, topk=6).tolist() == [0, -1, -1, -1, -1, -1]


def test_a_candidate_above_the_threshold_with_its_centre_outside_the_box_is_background():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    far = [[100.0 + 20 * k, 0.0, 110.0 + 20 * k, 10.0] for k in range(6)]
    # both 30x10 anchors contain the box (IoU 1/3); the first is centred at x = 15, outside it, the second at x = 5
    anchors = torch.tensor([[0.0, 0.0, 30.0, 10.0], [-10.0, 0.0, 20.0, 10.0], *far])
    ious = [1 / 3, 1 / 3] + [0.0] * 6
    mean = sum(ious) / 8  # 1/12
    threshold = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 7)  # 1/12 + 0.1543 = 0.2376
    assert threshold < 1 / 3
    assert atss_assign(anchors, [8], gt, topk=8).tolist() == [-1, 0, -1, -1, -1, -1, -1, -1]


def test_candidates_are_the_topk_closest_anchors_of_every_level():
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # centre (10, 10)
    # level 1: three 8x8 anchors centred 0, 1 and 1 px from the box centre, IoU 64 / 400 = 0.16 each;
    # level 2: a 20x24 anchor 2 px away (IoU 400 / 480 = 0.833) and one far away (IoU 0)
    anchors = torch.tensor([[6.0, 6.0, 14.0, 14.0], [7.0, 6.0, 15.0, 14.0], [5.0, 6.0, 13.0, 14.0],
                            [0.0, 0.0, 20.0, 24.0], [100.0, 100.0, 120.0, 120.0]])
    ious = [0.16, 0.16, 0.16, 400 / 480, 0.0]
    mean = sum(ious) / 5
    threshold = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 4)  # 0.2627 + 0.3264 = 0.5891
    assert ious[0] < threshold < ious[3]
    # three per level: the level-2 anchor is a candidate although the three of level 1 are closer
    assert atss_assign(anchors, [3, 2], gt, topk=3).tolist() == [-1, -1, -1, 0, -1]
    # the same anchors as one level: the three closest (IoU 0.16, std 0) are the candidates and all pass
    assert atss_assign(anchors, [5], gt, topk=3).tolist() == [0, 0, 0, -1, -1]


def test_an_anchor_claimed_by_several_boxes_goes_to_the_one_it_overlaps_most():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    # IoU 95 / 105 = 0.905 with the first box and 85 / 115 = 0.739 with the second; with three zero-IoU
    # candidates a lone IoU v has mean v / 4 and unbiased std v / 2: threshold 3v / 4, passed for both boxes
    anchors = torch.tensor([[0.5, 0.0, 10.5, 10.0], [50.0, 50.0, 60.0, 60.0], [70.0, 70.0, 80.0, 80.0],
                            [90.0, 90.0, 100.0, 100.0]])
    for gt in (boxes[:1], boxes[1:]):
        assert atss_assign(anchors, [4], gt, topk=4).tolist() == [0, -1, -1, -1]
    assert atss_assign(anchors, [4], boxes, topk=4).tolist() == [0, -1, -1, -1]
    assert atss_assign(anchors, [4], boxes.flip(0), topk=4).tolist() == [1, -1, -1, -1]


def test_without_boxes_every_anchor_is_background():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    assigned = atss_assign(anchors, [1, 1], torch.zeros(0, 4))
    assert assigned.dtype == torch.int64 and assigned.tolist() == [-1, -1]


# ---- the model -----------------------------------------------------------------------------------

def test_head_has_four_groupnorm_convolutions_per_tower_a_scale_per_level_and_the_prior_bias():
    model = _model(fpn_channels=64)
    head = model.head
    for tower in (head.cls_convs, head.reg_convs):
        convs = [m for m in tower if isinstance(m, nn.Conv2d)]
        norms = [m for m in tower if isinstance(m, nn.GroupNorm)]
        assert len(convs) == len(norms) == sum(isinstance(m, nn.ReLU) for m in tower) == 4
        assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)  # mmcv's ConvModule: no bias before GN
        assert all(n.num_groups == 32 for n in norms)
    assert [group_count(c) for c in (256, 96, 64, 32, 48, 2)] == [32, 32, 32, 16, 24, 1]  # two channels at least
    assert head.cls_logits.out_channels == 3 and head.bbox_pred.out_channels == 4 and head.centerness.out_channels == 1
    assert all(c.kernel_size == (3, 3) for c in (head.cls_logits, head.bbox_pred, head.centerness))
    assert len(head.scales) == 5 and all(s.scale.item() == 1.0 for s in head.scales)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((3,), -math.log(99.0)))  # sigmoid = 0.01
    assert head.bbox_pred.bias.abs().max() == 0 and head.centerness.bias.abs().max() == 0
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.01, rel=0.05)
    # P6 and P7 from the P5 output of the FPN ('on_output'), not from C5
    assert model.backbone.fpn.extra_blocks.use_P5
    assert list(model.backbone(torch.rand(1, 3, 128, 128))) == ['0', '1', '2', 'p6', 'p7']


def test_one_float32_square_anchor_of_eight_strides_per_location_even_under_bfloat16():
    model = _model()
    anchors, num_per_level = model.anchors(_pyramid(800, 1216, dtype=torch.bfloat16))
    assert anchors.dtype == torch.float32
    assert num_per_level == [100 * 152, 50 * 76, 25 * 38, 13 * 19, 7 * 10]
    levels = anchors.split(num_per_level)
    for level, stride in zip(levels, (8, 16, 32, 64, 128)):
        sides = level[:, 2:] - level[:, :2]
        assert (sides == 8 * stride).all()
        centres = (level[:, :2] + level[:, 2:]) / 2
        assert (centres % stride == 0).all()
    torch.testing.assert_close(levels[0][-1], torch.tensor([1176.0, 760.0, 1240.0, 824.0]))  # exact at 1216 px
    torch.testing.assert_close(levels[3][1], torch.tensor([-192.0, -256.0, 320.0, 256.0]))  # stride 64, not 1216 // 19


def test_anchors_on_the_batching_padding_are_not_valid():
    model = _model()
    anchors, num_per_level = model.anchors(_pyramid(128, 128))
    valid = [v.sum().item() for v in model.valid_anchors(anchors, (64, 128)).split(num_per_level)]
    assert valid == [8 * 16, 4 * 8, 2 * 4, 1 * 2, 1]
    valid = [v.sum().item() for v in model.valid_anchors(anchors, (70, 128)).split(num_per_level)]
    assert valid == [12 * 16, 6 * 8, 3 * 4, 2 * 2, 1]  # padded to 96 on its own


def _zero_head_losses(model: ATSSDetector) -> tuple:
    """``(losses, anchors, num_per_level, targets)`` of a 128x128 image with one box, for head outputs of zeros:
    every probability 0.5, every predicted box its anchor."""
    anchors, num_per_level = model.anchors(_pyramid(128, 128))
    count = len(anchors)
    zeros = dict(cls_logits=torch.zeros(1, count, 3), bbox_regression=torch.zeros(1, count, 4),
                 bbox_ctrness=torch.zeros(1, count))
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 80.0, 90.0]]), labels=torch.tensor([2]))]
    return model.compute_loss(zeros, anchors, num_per_level, targets, [(128, 128)]), anchors, num_per_level, targets


def test_losses_follow_mmdetections_normalisation():
    model = _model()
    losses, anchors, num_per_level, targets = _zero_head_losses(model)
    count = len(anchors)
    positive = atss_assign(anchors, num_per_level, targets[0]['boxes']) >= 0
    n = positive.sum().item()
    assert n > 0
    # focal loss at p = 0.5: (1 - alpha) p^2 ln 2 per negative (anchor, class), alpha (1 - p)^2 ln 2 per positive
    focal = (0.75 * 0.25 * LN2 * (3 * count - n) + 0.25 * 0.25 * LN2 * n) / n
    torch.testing.assert_close(losses['classification'], torch.tensor(focal))
    # binary cross-entropy of a zero logit is ln 2 whatever the target
    torch.testing.assert_close(losses['bbox_ctrness'], torch.tensor(LN2))
    gt = targets[0]['boxes'].expand(n, 4)
    weights = centerness_targets(anchors[positive], gt)
    giou = generalized_box_iou_loss(anchors[positive], gt, reduction='none')
    torch.testing.assert_close(losses['bbox_regression'], 2 * (giou * weights).sum() / weights.sum().clamp(min=1))


def test_normalisers_are_averaged_over_the_processes(monkeypatch):
    model = _model()
    alone = _zero_head_losses(model)[0]
    # a second process without positives: the averaged positives and centerness sums are halved
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'all_reduce', lambda tensor: None)
    together = _zero_head_losses(model)[0]
    torch.testing.assert_close(together['classification'], 2 * alone['classification'])
    torch.testing.assert_close(together['bbox_ctrness'], 2 * alone['bbox_ctrness'])
    assert together['bbox_regression'] > alone['bbox_regression']


def test_centerness_target_is_fcos_centerness():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [-6.0, 4.0, 14.0, 24.0]])  # centres (10, 10) and (4, 14)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0]])
    expected = torch.tensor([1.0, math.sqrt(4 / 16 * 6 / 14)])
    torch.testing.assert_close(centerness_targets(anchors, boxes), expected)


def test_a_training_step_gives_finite_losses_and_gradients_everywhere():
    model = _model()
    sizes = [(128, 128), (96, 120)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(2))
    assert set(losses) == {'classification', 'bbox_regression', 'bbox_ctrness'}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]  # DDP needs no search for unused parameters
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.body.parameters())
    for name, parameter in model.head.named_parameters():
        if not name.startswith('scales.'):  # a level's Scale learns from that level's positives only
            assert parameter.grad.abs().sum() > 0, name
    assert model.head.scales[0].scale.grad != 0  # the boxes (40-58 px) are positives of P3's 64 px anchors


def test_an_image_without_boxes_is_all_background():
    model = _model()
    targets = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))]
    losses = model([torch.rand(3, 128, 128)], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses['classification'] > 0 and losses['bbox_regression'] == 0 and losses['bbox_ctrness'] == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_eval_gives_sorted_detections_in_the_original_images_pixels():
    model = _model(score_thresh=0.0)
    model.eval()
    sizes = [(128, 128), (64, 96)]  # the second is resized by 4/3 to 85x128
    with torch.no_grad():
        outputs = model([torch.rand(3, *s) for s in sizes])
    for output, (h, w) in zip(outputs, sizes):
        assert set(output) == {'boxes', 'labels', 'scores'}
        assert output['boxes'].dtype == output['scores'].dtype == torch.float32
        assert output['labels'].dtype == torch.int64
        assert len(output['boxes']) == 100  # detections_per_img
        assert (output['scores'][:-1] >= output['scores'][1:]).all()
        assert output['labels'].min() >= 1 and output['labels'].max() <= 3
        assert output['boxes'].min() >= 0
        # clipped to the resized image, then scaled back: the border boxes end exactly at the original border
        assert output['boxes'][:, 2].max().item() == pytest.approx(w, abs=1e-3)
        assert output['boxes'][:, 3].max().item() == pytest.approx(h, abs=1e-3)
    with torch.no_grad():
        untrained = _model().eval()([torch.rand(3, 128, 128)])[0]
    assert len(untrained['boxes']) == 0  # score_thr 0.05 is above the initial scores, prior 0.01 x about 0.5


def test_any_timm_pyramid_backbone_at_any_size():
    model = _model('resnet18', min_size=200, max_size=336)
    sizes = [(190, 320), (150, 200)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(2))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    model.score_thresh = 0.0
    with torch.no_grad():
        output = model([torch.rand(3, 190, 320)])[0]
    assert len(output['boxes']) > 0
    assert (output['boxes'][:, 2] <= 320).all() and (output['boxes'][:, 3] <= 190).all()


def test_a_bfloat16_autocast_step_keeps_finite_losses_and_float32_boxes():
    model = _model()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model([torch.rand(3, 128, 128)], _targets(1))
        sum(losses.values()).backward()
        model.eval()
        model.score_thresh = 0.0
        with torch.no_grad():
            output = model([torch.rand(3, 128, 128)])[0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert output['boxes'].dtype == output['scores'].dtype == torch.float32
    assert torch.isfinite(output['boxes']).all()


def test_cost_parts_run_the_head_on_all_five_levels():
    model = _model()
    model.eval()
    x = torch.rand(1, 3, 128, 128)
    parts = model.cost_parts(x)
    assert set(parts) == {'backbone', 'neck', 'head'}
    with torch.no_grad():
        outputs = parts['head']()
    assert outputs['cls_logits'].shape == (1, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1, 3)


# ---- options and sizes ---------------------------------------------------------------------------

def test_options_are_taken_and_kept_in_the_config():
    model = _model(topk=5, score_thresh=0.1, nms_thresh=0.5, detections_per_img=50, topk_candidates=200)
    assert (model.topk, model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == \
        (5, 0.1, 0.5, 50, 200)
    assert model.config['topk'] == 5 and model.config['anchor_sizes'] == (64, 128, 256, 512, 1024)
    assert ATSSDetector.options() == {'topk', 'score_thresh', 'nms_thresh', 'detections_per_img', 'topk_candidates'}


@pytest.mark.parametrize('kwargs, message', [
    (dict(topk=0), 'topk 0: expected a whole number of at least 1'),
    (dict(topk=-1), 'topk -1'),
    (dict(topk=2.5), 'topk 2.5'),
    (dict(topk=True), 'topk True'),
    (dict(score_thresh=1.0), 'score_thresh 1.0: expected a number in \\[0, 1\\)'),
    (dict(score_thresh=-0.1), 'score_thresh -0.1'),
    (dict(score_thresh='0.05'), "score_thresh '0.05'"),
    (dict(nms_thresh=0), 'nms_thresh 0: expected a number in \\(0, 1\\]'),
    (dict(nms_thresh=1.5), 'nms_thresh 1.5'),
    (dict(nms_thresh=None), 'nms_thresh None'),
    (dict(detections_per_img=0), 'detections_per_img 0'),
    (dict(detections_per_img=-1), 'detections_per_img -1'),
    (dict(topk_candidates=0), 'topk_candidates 0'),
    (dict(topk_candidates=100.0), 'topk_candidates 100.0'),
    (dict(center_sampling_radius=1.5), 'ATSSDetector takes no option center_sampling_radius'),
    (dict(score_threshold=0.1), 'did you mean score_thresh'),
    (dict(fpn_channels=1), 'fpn_channels 1: .* expected 2 or more'),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ATSSDetector.build('dat_nano', 3, **dict(SMALL, **kwargs))


@pytest.mark.parametrize('backbone, paper', [('resnet50', 32), ('swin_tiny_patch4_window7_224', 36)])
def test_atss_matches_eapt_table_4_in_parameters(backbone, paper):
    params = count_parameters(ATSSDetector.build(backbone, 80)) / 1e6
    assert params == pytest.approx(paper, rel=0.03)
