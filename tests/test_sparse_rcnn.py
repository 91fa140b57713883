"""Sparse R-CNN: the learnable proposals, the dynamic heads of mmdetection's config, the Hungarian set
prediction and its losses, the detached refinement, the detections, and the sizes of EAPT Table IV."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from deformvit.errors import UsageError
from deformvit.tasks.detection.sparse_rcnn import (SparseRCNNDetector, StageOutput, hungarian_match,
                                                   matching_cost)
from deformvit.tools.complexity import count_parameters

SMALL = dict(min_size=128, max_size=128, fpn_channels=32)


def _model(backbone='dat_nano', **kwargs):
    torch.manual_seed(0)
    return SparseRCNNDetector.build(backbone, 3, **dict(SMALL, **kwargs))


def _targets(sizes) -> list:
    return [dict(boxes=torch.tensor([[10.0 + i, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                 labels=torch.tensor([1, 3])) for i, _ in enumerate(sizes)]


def _no_boxes() -> dict:
    return dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))


# ---- matching --------------------------------------------------------------------------------------

@pytest.mark.parametrize('proposals, boxes', [(4, 4), (7, 3), (6, 1), (5, 0), (3, 5)])
def test_hungarian_match_finds_the_least_cost_one_to_one_matching(proposals, boxes):
    generator = torch.Generator().manual_seed(proposals * 10 + boxes)
    for _ in range(5):
        cost = torch.randn(proposals, boxes, generator=generator)
        rows, cols = hungarian_match(cost)
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(proposals, boxes)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if proposals >= boxes:  # every box gets its own proposal
            best = min((sum(cost[p, b].item() for b, p in enumerate(chosen)), chosen)
                       for chosen in itertools.permutations(range(proposals), boxes))
            assert sorted(zip(cols.tolist(), rows.tolist())) == list(enumerate(best[1]))
        else:  # every proposal gets its own box
            best = min((sum(cost[p, b].item() for p, b in enumerate(chosen)), chosen)
                       for chosen in itertools.permutations(range(boxes), proposals))
            assert list(zip(rows.tolist(), cols.tolist())) == list(enumerate(best[1]))
        assert cost[rows, cols].sum().item() == pytest.approx(best[0], abs=1e-5)


def test_matching_costs_weigh_focal_class_cost_normalised_l1_and_giou_by_two_five_and_two():
    logits = torch.zeros(2, 2)  # p = 0.5 for both classes
    boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0], [50.0, 50.0, 100.0, 100.0]])
    gt_boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0]])
    cost = matching_cost(logits, boxes, torch.tensor([2]), gt_boxes, (100, 100))
    # focal cost at p = 0.5: 0.25 x 0.5^2 x -log 0.5 - 0.75 x 0.5^2 x -log 0.5
    focal = 0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)
    # proposal 0 is the box (L1 0, GIoU 1); proposal 1 is 0.5 away in every coordinate, GIoU 0 - 5000 / 10000
    expected = torch.tensor([[2 * focal + 5 * 0.0 - 2 * 1.0], [2 * focal + 5 * 2.0 - 2 * -0.5]])
    torch.testing.assert_close(cost, expected)
    # a confident, right class costs less; the L1 is of image-size-normalised boxes (a 200x100 image halves x)
    confident = matching_cost(torch.tensor([[-5.0, 5.0]]), boxes[:1], torch.tensor([2]), gt_boxes, (100, 100))
    assert confident < cost[0]
    wide = matching_cost(logits[1:], boxes[1:], torch.tensor([2]), gt_boxes, (100, 200))
    torch.testing.assert_close(wide, torch.tensor([[2 * focal + 5 * 1.5 + 2 * 0.5]]))


def test_stage_losses_are_weighted_and_normalised_by_the_matched_boxes():
    head = _model().head
    logits = torch.zeros(1, 2, 3)
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 60.0], [50.0, 50.0, 100.0, 100.0]]])
    targets = [dict(boxes=torch.tensor([[0.0, 0.0, 50.0, 50.0]]), labels=torch.tensor([2]))]
    losses = head.stage_losses(StageOutput(boxes, logits, boxes), targets, [(100, 100)])
    # sigmoid focal loss at p = 0.5 over 2 x 3 entries, one of them the matched proposal's class
    focal = 0.25 * 0.25 * math.log(2) + 5 * 0.75 * 0.25 * math.log(2)
    torch.testing.assert_close(losses['loss_cls'], torch.tensor(2 * focal))
    torch.testing.assert_close(losses['loss_bbox'], torch.tensor(5 * 10 / 100))  # y2 is 10 px of 100 off
    torch.testing.assert_close(losses['loss_iou'], torch.tensor(2 * (1 - 2500 / 3000)))
    # two such images: twice the sums over twice the matched boxes
    twice = head.stage_losses(StageOutput(boxes.repeat(2, 1, 1), logits.repeat(2, 1, 1), boxes.repeat(2, 1, 1)),
                              targets * 2, [(100, 100)] * 2)
    for name in losses:
        torch.testing.assert_close(twice[name], losses[name])


# ---- the architecture ------------------------------------------------------------------------------

def test_heads_follow_mmdetections_config():
    model = _model()
    head = model.head
    assert head.proposal_boxes.weight.shape == (300, 4) and head.proposal_features.weight.shape == (300, 32)
    torch.testing.assert_close(head.proposal_boxes.weight, torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(300, 4))
    boxes, features = head.initial_proposals([(96, 120), (128, 80)])
    torch.testing.assert_close(boxes[:, 0], torch.tensor([[0.0, 0.0, 120.0, 96.0], [0.0, 0.0, 80.0, 128.0]]))
    assert features.shape == (2, 300, 32)
    assert len(head.stages) == 6
    assert head.roi_pool.output_size == (7, 7) and head.roi_pool.sampling_ratio == 2
    assert list(model.backbone.fpn.inner_blocks) and model.backbone.fpn.extra_blocks is None
    assert SparseRCNNDetector.strides == (4, 8, 16, 32)
    stage = head.stages[0]
    assert stage.attention.num_heads == 8
    assert stage.interaction.dynamic_channels == 64
    assert stage.interaction.kernel_generator.out_features == 2 * 32 * 64
    assert stage.interaction.projection.in_features == 32 * 7 * 7
    assert stage.ffn[0].out_features == 2048
    assert sum(isinstance(m, nn.Linear) for m in stage.cls_fcs.modules()) == 1
    assert sum(isinstance(m, nn.Linear) for m in stage.reg_fcs.modules()) == 3
    assert stage.classifier.out_features == 3 and stage.regressor.out_features == 4
    torch.testing.assert_close(stage.classifier.bias, torch.full((3,), -math.log(99)))
    assert stage.coder.weights == (2.0, 2.0, 1.0, 1.0)  # target stds (0.5, 0.5, 1, 1)


def test_box_deltas_decode_as_mmdetections_coder_with_stds_half_half_one_one():
    stage = _model().head.stages[0]
    proposal = torch.tensor([[[10.0, 20.0, 50.0, 60.0]]])  # centre (30, 40), size 40 x 40
    deltas = torch.tensor([[[0.2, -0.4, math.log(1.5), 0.0]]])
    # centre moves by 0.5 x delta x size, size scales by exp(1 x delta)
    expected = torch.tensor([[[34.0 - 30.0, 32.0 - 20.0, 34.0 + 30.0, 32.0 + 20.0]]])
    torch.testing.assert_close(stage.decode(deltas, proposal), expected)


def test_stages_refine_the_previous_stages_detached_boxes():
    model = _model(num_stages=3, num_proposals=20)
    head = model.head
    sizes = [(128, 128)]
    features = model.backbone(torch.rand(1, 3, 128, 128))
    outputs = head.run(features, sizes)
    assert len(outputs) == 3
    initial, _ = head.initial_proposals(sizes)
    torch.testing.assert_close(outputs[0].proposals, initial)
    for previous, current in zip(outputs, outputs[1:]):
        assert not current.proposals.requires_grad and previous.boxes.requires_grad
        torch.testing.assert_close(current.proposals, previous.boxes.detach())
    # the second stage's losses reach the first stage through the object features, not through its boxes
    sum(head.stage_losses(outputs[1], _targets(sizes), sizes).values()).backward()
    first = head.stages[0]
    assert first.regressor.weight.grad is None and first.classifier.weight.grad is None
    assert first.attention.in_proj_weight.grad.abs().sum() > 0
    assert head.stages[2].regressor.weight.grad is None


# ---- training ----------------------------------------------------------------------------------------

def test_a_training_step_gives_finite_losses_per_stage_and_gradients_everywhere():
    model = _model()
    sizes = [(128, 128), (96, 120)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes))
    assert set(losses) == {f'stage{t}_loss_{p}' for t in range(6) for p in ('cls', 'bbox', 'iou')}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    assert model.head.proposal_boxes.weight.grad.abs().sum() > 0
    assert model.head.proposal_features.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.backbone.body.parameters())
    assert all(p.grad.abs().sum() > 0 for stage in model.head.stages for p in stage.parameters())


def test_an_image_without_boxes_trains_on_the_background_only():
    model = _model(num_proposals=20)
    losses = model([torch.rand(3, 128, 128)], [_no_boxes()])
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[f'stage{t}_loss_{p}'] == 0 for t in range(6) for p in ('bbox', 'iou'))
    assert all(losses[f'stage{t}_loss_cls'] > 0 for t in range(6))
    sum(losses.values()).backward()  # every parameter still takes part (DDP needs no unused-parameter search)
    assert all(p.grad is not None for p in model.parameters())
    mixed = model([torch.rand(3, 128, 128)] * 2, [_no_boxes(), _targets([(128, 128)])[0]])
    assert all(torch.isfinite(v) for v in mixed.values())


def test_a_bfloat16_autocast_step_keeps_float32_boxes_and_finite_losses():
    model = _model(num_proposals=50)
    sizes = [(128, 128)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes))
        outputs = model.head.run(model.backbone(torch.rand(1, 3, 128, 128)), sizes)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert all(o.logits.dtype == o.boxes.dtype == torch.float32 for o in outputs)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- inference -----------------------------------------------------------------------------------

def test_eval_gives_the_top_scores_over_proposals_and_classes_in_original_pixels():
    model = _model(detections_per_img=50)
    model.eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 80, 112)]
    with torch.no_grad():
        outputs = model(images)
        batch, _ = model.transform(images)
        last = model.head.run(model.backbone(batch.tensors), batch.image_sizes)[-1]
    for i, (output, image) in enumerate(zip(outputs, images)):
        h, w = image.shape[-2:]
        assert set(output) == {'boxes', 'labels', 'scores'} and len(output['boxes']) == 50
        assert output['boxes'].dtype == output['scores'].dtype == torch.float32
        assert output['labels'].dtype == torch.int64
        assert output['labels'].min() >= 1 and output['labels'].max() <= 3
        assert (output['scores'][:-1] >= output['scores'][1:]).all()
        boxes = output['boxes']
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        scores = last.logits[i].sigmoid()  # (P, K): the top 50 of all of them, no NMS
        torch.testing.assert_close(output['scores'], scores.flatten().topk(50).values)
        resized_h, resized_w = batch.image_sizes[i]
        proposal = (scores == output['scores'][0]).nonzero()[0, 0]
        expected = last.boxes[i, proposal].clamp(min=0).minimum(torch.tensor([resized_w, resized_h] * 2))
        torch.testing.assert_close(output['boxes'][0], expected * torch.tensor([w / resized_w, h / resized_h] * 2))


def test_any_timm_pyramid_backbone_at_any_size():
    torch.manual_seed(0)
    model = SparseRCNNDetector.build('resnet18', 3, min_size=200, max_size=336, fpn_channels=32, num_proposals=30,
                                     num_stages=2)
    sizes = [(190, 320), (150, 200)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        output = model([torch.rand(3, 190, 320)])[0]
    assert len(output['boxes']) == 90  # 30 x 3, fewer proposals x classes than detections_per_img
    assert (output['boxes'][:, 2] <= 320).all() and (output['boxes'][:, 3] <= 190).all()


def test_cost_parts_run_every_stage_on_the_learnt_proposals():
    model = _model(num_proposals=40, num_stages=2)
    model.eval()
    x = torch.rand(1, 3, 96, 128)
    parts = model.cost_parts(x, proposals=1000)
    assert set(parts) == {'backbone', 'neck', 'head'}
    with torch.no_grad():
        assert len(parts['backbone']()) == 4 and list(parts['neck']()) == ['0', '1', '2', '3']
        outputs = parts['head']()
    assert len(outputs) == 2 and outputs[-1].boxes.shape == (1, 40, 4)


# ---- options and sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(num_proposals=0), 'num_proposals 0: expected a whole number of at least 1'),
    (dict(num_proposals=-1), 'num_proposals -1'),
    (dict(num_proposals=2.5), 'num_proposals 2.5'),
    (dict(num_proposals='many'), "num_proposals 'many'"),
    (dict(num_stages=0), 'num_stages 0'),
    (dict(num_stages=True), 'num_stages True'),
    (dict(detections_per_img=0), 'detections_per_img 0'),
    (dict(detections_per_img=None), 'detections_per_img None'),
    (dict(class_weight=-1), 'class_weight -1: expected a non-negative number'),
    (dict(l1_weight='five'), "l1_weight 'five'"),
    (dict(giou_weight=float('nan')), 'giou_weight nan'),
    (dict(giou_weight=float('inf')), 'giou_weight inf'),
    (dict(num_proposal=100), 'takes no option num_proposal; did you mean num_proposals'),
    (dict(box_score_thresh=0.05), 'takes no option box_score_thresh'),
    (dict(fpn_channels=36), 'fpn_channels 36 is not a multiple of the 8 attention heads'),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SparseRCNNDetector.build('dat_nano', 3, **dict(SMALL, **kwargs))


def test_options_and_config_rebuild_the_model():
    model = _model(num_proposals=10, num_stages=2, detections_per_img=5, class_weight=1, l1_weight=0)
    assert SparseRCNNDetector.options() == {'num_proposals', 'num_stages', 'detections_per_img', 'class_weight',
                                            'l1_weight', 'giou_weight'}
    assert model.head.weights == (1.0, 0.0, 2.0) and model.head.detections_per_img == 5
    rebuilt = SparseRCNNDetector.build(**model.config)
    assert count_parameters(rebuilt) == count_parameters(model)
    assert not model.has_masks()


@pytest.mark.parametrize('backbone, paper', [
    ('resnet50', 106),  # EAPT Table IV
    ('swin_tiny_patch4_window7_224', 110),  # EAPT Table IV
])
def test_sparse_rcnn_matches_eapt_table_iv_in_parameters(backbone, paper):
    params = count_parameters(SparseRCNNDetector.build(backbone, 80)) / 1e6
    assert params == pytest.approx(paper, rel=0.03)
