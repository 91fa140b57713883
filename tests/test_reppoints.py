"""RepPoints v2: point sets to boxes, the head's layout and its verification branches, the three assigners
(nearest location, ATSS, corner heat maps) and the foreground maps, the official losses, inference in the
images' pixels, and the sizes of Swin Transformer's and EAPT Table IV's RepPoints v2 rows."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import DeformConv2d

from deformvit.errors import UsageError
from deformvit.tasks.detection import reppoints
from deformvit.tasks.detection.reppoints import (
    BiFPN, RepPointsV2Detector, box_levels, corner_targets, foreground_targets, point_assign, points_to_boxes)
from deformvit.tools.complexity import count_macs_of, count_parameters

SMALL = dict(min_size=128, max_size=128, fpn_channels=32)
LOSSES = {'loss_cls', 'loss_pts_init', 'loss_pts_refine', 'loss_heatmap', 'loss_offset', 'loss_sem'}


def _model(backbone: str = 'dat_nano', **kwargs) -> RepPointsV2Detector:
    torch.manual_seed(0)
    return RepPointsV2Detector.build(backbone, 3, **dict(SMALL, **kwargs))


def _targets(sizes) -> list:
    return [dict(boxes=torch.tensor([[10.0 + i, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                 labels=torch.tensor([1, 2])) for i, _ in enumerate(sizes)]


def _no_boxes() -> dict:
    return dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))


# ---- points and boxes ----------------------------------------------------------------------------

def test_points_to_boxes_reads_the_first_two_points_as_corners_or_takes_the_extremes():
    points = torch.tensor([[[2.0, 3.0], [8.0, 9.0], [-5.0, 4.0], [6.0, 20.0]]])  # (1, P=4, 2) x, y
    assert points_to_boxes(points).tolist() == [[2.0, 3.0, 8.0, 9.0]]  # exact_minmax, the configuration's
    assert points_to_boxes(points, 'minmax').tolist() == [[-5.0, 3.0, 8.0, 20.0]]
    assert points_to_boxes(points.expand(2, 3, 4, 2)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match='moment'):
        points_to_boxes(points, 'moment')


def test_network_offsets_are_dy_dx_pairs_in_strides_around_each_location():
    model = _model()
    grid = model.point_grid([(2, 2), (1, 1)], torch.device('cpu'))
    assert grid.centres.tolist() == [[0, 0], [8, 0], [0, 8], [8, 8], [0, 0]]  # row by row, x = col x stride
    assert grid.strides.tolist() == [8, 8, 8, 8, 16] and grid.levels.tolist() == [0, 0, 0, 0, 1]
    raw = torch.zeros(1, 5, 18)
    raw[0, 3, :4] = torch.tensor([1.0, -2.0, 0.5, 0.25])  # location (8, 8): point 0 (dy 1, dx -2), point 1
    points = model.points(raw, grid)  # (1, 5, 9, 2)
    assert points[0, 3, 0].tolist() == [8 - 16, 8 + 8] and points[0, 3, 1].tolist() == [8 + 2, 8 + 4]
    assert points[0, 4, 5].tolist() == [0, 0]


# ---- the head ------------------------------------------------------------------------------------

def test_head_has_the_official_towers_branches_and_deformable_convolutions():
    head = _model().head
    for tower, convs in ((head.cls_convs, 3), (head.reg_convs, 3), (head.shared_convs, 1)):
        assert len(tower) == convs
        for conv, norm, relu in tower:
            assert conv.kernel_size == (3, 3) and conv.bias is None
            assert isinstance(norm, nn.GroupNorm) and isinstance(relu, nn.ReLU)
    for deform in (head.cls_deform_conv, head.points_refine_deform_conv):
        assert isinstance(deform, DeformConv2d) and deform.kernel_size == (3, 3) and deform.bias is None
        assert deform.in_channels == 32 + 6  # the tower's features, two corner heat maps and four offsets
    assert head.points_init_out.out_channels == head.points_refine_out.out_channels == 18  # 9 points
    assert head.cls_out.out_channels == head.foreground_logits.out_channels == 3
    assert [c.out_channels for c in (head.top_left_heat, head.bottom_right_heat)] == [1, 1]
    assert [c.out_channels for c in (head.top_left_offset, head.bottom_right_offset)] == [2, 2]
    assert head.top_left_pool.towards_start and not head.bottom_right_pool.towards_start
    prior = torch.tensor(-4.59512)  # sigmoid 0.01
    for conv in (head.cls_out, head.top_left_heat, head.bottom_right_heat, head.foreground_logits):
        torch.testing.assert_close(conv.bias, prior.expand_as(conv.bias))
    outputs = head([torch.rand(2, 32, 16, 12), torch.rand(2, 32, 8, 6)])
    assert len(outputs) == 2
    channels = [(3, 16, 12), (18, 16, 12), (18, 16, 12), (2, 16, 12), (4, 16, 12), (3, 16, 12)]
    assert [tuple(t.shape[1:]) for t in outputs[0]] == channels


def test_corner_pooling_keeps_the_running_maximum_towards_the_corner():
    x = torch.tensor([[1.0, 3.0, 2.0]])
    assert reppoints._corner_pool(x, 1, towards_start=True).tolist() == [[3.0, 3.0, 2.0]]  # top / left
    assert reppoints._corner_pool(x, 1, towards_start=False).tolist() == [[1.0, 3.0, 3.0]]  # bottom / right


def test_bifpn_max_pools_p6_p7_from_c5_and_fuses_five_levels_twice():
    neck = BiFPN([16, 24, 40], 32)
    assert len(neck.layers) == 2
    first, second = neck.layers
    assert [type(m).__name__ for m in first.laterals] == ['Sequential'] * 5  # C3-C5 and P6, P7 of C5's width
    assert first.laterals[3][0].in_channels == 40
    assert all(isinstance(m, nn.Identity) for m in second.laterals)
    assert [f.weights.numel() for f in first.top_down_fusions] == [2, 2, 2, 2]
    assert [f.weights.numel() for f in first.bottom_up_fusions] == [3, 3, 3, 2]  # the top level has no lateral
    levels = {'0': torch.rand(1, 16, 16, 24), '1': torch.rand(1, 24, 8, 12), '2': torch.rand(1, 40, 4, 6)}
    pyramid = neck(levels)
    assert list(pyramid) == ['0', '1', '2', 'p6', 'p7']
    assert [tuple(v.shape) for v in pyramid.values()] == [(1, 32, 16, 24), (1, 32, 8, 12), (1, 32, 4, 6),
                                                          (1, 32, 2, 3), (1, 32, 1, 2)]


def test_quality_focal_loss_targets_the_iou_of_the_refined_box():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 4.0, 4.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    torch.testing.assert_close(reppoints._aligned_iou(boxes, gt), torch.tensor([1.0, 1 / 3, 0.0]))
    logits = torch.zeros(2, 3)
    target = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    # at the positive's class sigmoid 0.5 meets the target 0.5: no loss; elsewhere BCE(0, 0) x 0.5^2
    expected = 5 * torch.log(torch.tensor(2.0)) * 0.25
    torch.testing.assert_close(reppoints._quality_focal_loss(logits, target), expected)


def test_verification_maps_feed_the_classifier_and_initial_points_get_a_tenth_of_its_gradient():
    head = _model().head
    x = torch.rand(1, 32, 8, 8)
    before = head.forward_level(x)
    with torch.no_grad():
        head.top_left_heat.bias.add_(1.0)
    after = head.forward_level(x)
    assert not torch.allclose(before.cls_logits, after.cls_logits)
    assert not torch.allclose(before.points_refine, after.points_refine)
    torch.testing.assert_close(before.points_init, after.points_init)
    gradients = []
    for gradient_mul in (0.1, 1.0):
        head.gradient_mul = gradient_mul
        head.zero_grad()
        head.forward_level(x).cls_logits.sum().backward()
        gradients.append(head.points_init_out.weight.grad.clone())
    torch.testing.assert_close(gradients[0], 0.1 * gradients[1], rtol=1e-3, atol=1e-9)


def test_refined_points_add_to_the_detached_initial_points():
    head = _model().head
    outputs = head.forward_level(torch.rand(1, 32, 8, 8))
    outputs.points_refine.sum().backward()
    assert head.points_init_out.weight.grad is not None  # through the deformable offsets only (x 0.1)
    head.zero_grad()
    head.gradient_mul = 0.0
    head.forward_level(torch.rand(1, 32, 8, 8)).points_refine.sum().backward()
    assert not head.points_init_out.weight.grad.any()


# ---- targets -------------------------------------------------------------------------------------

def test_boxes_train_the_initial_points_of_the_nearest_location_on_their_level():
    base = (32, 64, 128, 256, 512)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 100.0, 180.0],
                          [0.0, 0.0, 2000.0, 2000.0]])
    assert box_levels(boxes, base).tolist() == [0, 1, 2, 4]  # sqrt(wh): 20 -> P3, 64 -> P4, 134 -> P5, 2000 -> P7
    grid = _model().point_grid([(8, 8), (4, 4)], torch.device('cpu'))
    gt = torch.tensor([[12.0, 12.0, 30.0, 30.0], [1.0, 2.0, 6.0, 30.0], [16.0, 16.0, 88.0, 88.0]])
    levels = box_levels(gt, base)
    assert levels.tolist() == [0, 0, 1]
    assigned = point_assign(grid.centres, grid.levels, gt, levels)
    positives = torch.where(assigned >= 0)[0]
    # box 0 (centre 21, 21): (24, 24) of P3; box 1 (centre 3.5, 16, 5 x 28 pixels): distances in box sides,
    # x 0 is 0.7 widths away, x 8 0.9: (0, 16); box 2 (P4, centre 52, 52): (48, 48) of P4
    assert {assigned[i].item(): grid.centres[i].tolist() + [grid.levels[i].item()] for i in positives} == {
        0: [24.0, 24.0, 0], 1: [0.0, 16.0, 0], 2: [48.0, 48.0, 1]}
    assert (point_assign(grid.centres, grid.levels, gt[:0], levels[:0]) == -1).all()


def test_corner_heat_maps_peak_at_the_nearest_location_of_every_level_with_offsets():
    grid = _model().point_grid([(16, 16), (8, 8)], torch.device('cpu'))
    gt = torch.tensor([[16.0, 10.0, 107.0, 123.0]])
    heat, offsets, peaks = corner_targets(grid.centres, grid.levels, grid.strides, gt)
    assert peaks.sum(0).tolist() == [2, 2]  # each corner: one peak per level
    top_left, bottom_right = torch.where(peaks[:, 0])[0], torch.where(peaks[:, 1])[0]
    assert grid.centres[top_left].tolist() == [[16.0, 8.0], [16.0, 16.0]]  # P3 (16, 8) and P4 (16, 16)
    assert offsets[top_left, :2].tolist() == [[0.0, 0.25], [0.0, -0.375]]  # (corner - location) / stride
    assert grid.centres[bottom_right].tolist() == [[104.0, 120.0], [112.0, 112.0]]
    assert offsets[bottom_right, 2:].tolist() == [[0.375, 0.375], [-0.3125, 0.6875]]
    assert not offsets[~peaks.any(1)].any()
    # the Gaussian bump: P3 (16, 16) is 6 pixels from the top-left corner, within the radius of the 91 x 113 box
    radius = reppoints.gaussian_radius(torch.tensor([113.0]), torch.tensor([91.0]))
    sigma = (2 * radius + 1) / 6
    assert 6 < radius < 8.25  # (8, 8) and (16, 0) lie outside
    p3 = heat[grid.levels == 0, 0].reshape(16, 16)
    torch.testing.assert_close(p3[2, 2], torch.exp(-36 / (2 * sigma ** 2))[0])
    assert p3.gt(0).sum() == 2


def test_foreground_maps_cover_the_cells_of_each_box_weighted_by_the_smaller_box():
    gt = torch.tensor([[0.0, 0.0, 31.0, 15.0], [8.0, 0.0, 15.0, 7.0], [0.0, 0.0, 8.0, 8.0]])
    target, weight = foreground_targets(gt, torch.tensor([1, 1, 3]), 3, (4, 6))
    expected = torch.zeros(4, 6)
    expected[:2, :4] = 1  # box 0: cells 0-1 x 0-3
    assert target[0].tolist() == expected.tolist() and not target[1].any()
    assert target[2, :2, :2].all() and target[2].sum() == 4  # (8, 8) lies in cell 1
    assert weight[0, 0, 1] == 1 / 49 and weight[0, 0, 0] == 1 / 465 and weight[0, 1, 3] == 1 / 465
    empty_target, empty_weight = foreground_targets(gt[:0], torch.zeros(0, dtype=torch.int64), 3, (4, 6))
    assert not empty_target.any() and not empty_weight.any()


def test_refined_points_and_classifier_are_labelled_by_atss_over_the_initial_boxes(monkeypatch):
    model = _model()
    calls = []

    def atss_spy(anchors, num_per_level, gt_boxes, topk=9):
        calls.append((anchors, num_per_level, gt_boxes, topk))
        return torch.full((len(anchors),), -1, dtype=torch.int64)
    captured = {}
    decode = model.decode

    def decode_spy(outputs, grid):
        captured['predictions'], captured['grid'] = decode(outputs, grid), grid
        return captured['predictions']
    monkeypatch.setattr(reppoints, 'atss_assign', atss_spy)
    monkeypatch.setattr(model, 'decode', decode_spy)
    losses = model([torch.rand(3, 128, 128)], _targets([(128, 128)]))
    assert len(calls) == 1
    anchors, num_per_level, gt_boxes, topk = calls[0]
    assert num_per_level == [h * w for h, w in captured['grid'].sizes] and topk == 9
    initial = captured['predictions'].boxes_init[0].detach()
    torch.testing.assert_close(anchors, initial)
    assert (anchors[:, 2:] >= anchors[:, :2]).all()  # corners in order
    assert not anchors.requires_grad and gt_boxes.tolist() == _targets([(128, 128)])[0]['boxes'].tolist()
    # nothing assigned: no refinement loss, the classifier sees only background, the initial points still train
    assert losses['loss_pts_refine'] == 0 and losses['loss_pts_init'] > 0
    logits = captured['predictions'].cls_logits[0].detach()
    background = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction='none')
    torch.testing.assert_close(losses['loss_cls'].detach(), (background * logits.sigmoid() ** 2).sum())
    monkeypatch.undo()
    assert _model()([torch.rand(3, 128, 128)], _targets([(128, 128)]))['loss_pts_refine'] > 0


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs', [{}, dict(neck='fpn', classification_loss='focal')])
def test_a_training_step_has_finite_losses_and_reaches_every_parameter(kwargs):
    model = _model(**kwargs)
    sizes = [(128, 128), (100, 120)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes))
    assert set(losses) == LOSSES
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert all(v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert isinstance(model.backbone.fpn, BiFPN) == (not kwargs)  # the tables' BiFPN, or the FPN


def test_an_image_without_boxes_trains_on_background_only_and_keeps_every_gradient():
    model = _model()
    losses = model([torch.rand(3, 128, 128)], [_no_boxes()])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses['loss_pts_init'] == losses['loss_pts_refine'] == losses['loss_offset'] == 0
    assert losses['loss_cls'] > 0 and losses['loss_heatmap'] > 0 and losses['loss_sem'] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP: every parameter in the graph
    mixed = model([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], [_no_boxes(), _targets([(128, 128)])[0]])
    assert all(torch.isfinite(v) for v in mixed.values())


def test_a_bfloat16_autocast_step_has_finite_float32_losses():
    model = _model()
    sizes = [(128, 128), (100, 128)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        output = model([torch.rand(3, 100, 128)])[0]
    assert output['boxes'].dtype == output['scores'].dtype == torch.float32


def test_bad_targets_are_refused():
    model = _model()
    with pytest.raises(ValueError, match='labels lie in 1..3'):
        model([torch.rand(3, 128, 128)], [dict(boxes=torch.tensor([[0.0, 0, 10, 10]]), labels=torch.tensor([4]))])
    with pytest.raises(ValueError, match='positive width'):
        model([torch.rand(3, 128, 128)], [dict(boxes=torch.tensor([[10.0, 0, 10, 10]]), labels=torch.tensor([1]))])
    with pytest.raises(ValueError, match='targets are needed'):
        model([torch.rand(3, 128, 128)])


# ---- inference -----------------------------------------------------------------------------------

def test_detections_follow_the_test_configuration_in_the_original_images_pixels(monkeypatch):
    model = _model(score_thresh=0.0, max_size=256).eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 100, 150), torch.rand(3, 90, 70)])
    for output, (h, w) in zip(outputs, [(100, 150), (90, 70)]):
        assert set(output) == {'boxes', 'labels', 'scores'}
        assert output['boxes'].dtype == output['scores'].dtype == torch.float32
        assert output['labels'].dtype == torch.int64 and output['labels'].min() >= 1 and output['labels'].max() <= 3
        assert len(output['boxes']) == model.detections_per_img == 100
        assert (output['scores'][:-1] >= output['scores'][1:]).all()
        assert (output['boxes'] >= 0).all() and (output['boxes'][:, 0::2] <= w).all()
        assert (output['boxes'][:, 1::2] <= h).all()
        assert (output['boxes'][:, 2:] >= output['boxes'][:, :2]).all()  # xyxy even from untrained corner points
    resized = torch.tensor([[12.8, 25.6, 64.0, 128.0]])  # in the 128 x 192 resized image

    def detect(outputs, predictions, grid, image_sizes):
        assert image_sizes == [(128, 192)]
        return [dict(boxes=resized, labels=torch.tensor([2]), scores=torch.tensor([0.9]))]
    monkeypatch.setattr(model, 'detect', detect)
    with torch.no_grad():
        output = model([torch.rand(3, 100, 150)])[0]
    torch.testing.assert_close(output['boxes'], torch.tensor([[10.0, 20.0, 50.0, 100.0]]))


def test_inference_defaults_are_the_configurations_test_cfg():
    model = _model()
    assert (model.topk_candidates, model.score_thresh, model.nms_thresh, model.detections_per_img) == (
        1000, 0.05, 0.6, 100)
    assert model.point_strides == (8, 16, 32, 64, 128) and model.base_scales == (32, 64, 128, 256, 512)
    assert RepPointsV2Detector.strides == (8, 16, 32) and model.transform_method == 'exact_minmax'
    assert model.classification_loss == 'quality_focal' and isinstance(model.backbone.fpn, BiFPN)


def test_corners_move_to_the_best_heat_map_cell_around_them_plus_its_offset():
    heat = torch.full((2, 4, 4), -10.0)
    offsets = torch.zeros(4, 4, 4)
    heat[0, 2, 1] = 5.0  # top-left peak at row 2, col 1
    offsets[0:2, 2, 1] = torch.tensor([0.25, -0.5])
    heat[1, 3, 3] = 5.0  # bottom-right peak at row 3, col 3
    boxes = torch.tensor([[9.0, 17.0, 21.0, 21.0]])  # stride 8: top-left in cell (2, 1), bottom-right in (2, 2)
    verified = RepPointsV2Detector.verify_corners(boxes, heat, offsets, 8)
    assert verified.tolist() == [[(1 + 0.25) * 8, (2 - 0.5) * 8, 3 * 8, 3 * 8]]


def test_any_timm_pyramid_backbone_at_any_size():
    torch.manual_seed(0)
    model = RepPointsV2Detector.build('resnet18', 3, min_size=200, max_size=336, fpn_channels=32)
    sizes = [(190, 320), (150, 200)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    model.score_thresh = 0.0
    with torch.no_grad():
        output = model([torch.rand(3, 190, 320)])[0]
    assert len(output['boxes']) > 0 and (output['boxes'][:, 2] <= 320).all() and (output['boxes'][:, 3] <= 190).all()


def test_cost_parts_run_the_head_on_all_five_levels(monkeypatch):
    model = _model().eval()
    parts = model.cost_parts(torch.rand(1, 3, 128, 192))
    assert set(parts) == {'backbone', 'neck', 'head'}
    levels = []
    forward_level = type(model.head).forward_level

    def recording(self, x):
        levels.append(x.shape[-2:])
        return forward_level(self, x)
    monkeypatch.setattr(type(model.head), 'forward_level', recording)
    assert count_macs_of(parts['head'])[0] > 0
    assert levels == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]


# ---- options and sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(score_thresh=1.5), r'score_thresh 1.5: expected a class score in \[0, 1\)'),
    (dict(score_thresh='low'), "score_thresh 'low'"),
    (dict(nms_thresh=0), r'nms_thresh 0: expected an IoU in \(0, 1\]'),
    (dict(nms_thresh=-1), 'nms_thresh -1'),
    (dict(detections_per_img=0), 'detections_per_img 0: expected a positive whole number'),
    (dict(detections_per_img=2.5), 'detections_per_img 2.5'),
    (dict(topk_candidates=-1), 'topk_candidates -1'),
    (dict(topk_candidates=True), 'topk_candidates True'),
    (dict(num_points=4), 'num_points 4: expected an odd square greater than 1'),
    (dict(num_points=1), 'num_points 1'),
    (dict(num_points=0), 'num_points 0'),
    (dict(gradient_mul=2), r'gradient_mul 2: expected a gradient share in \[0, 1\]'),
    (dict(transform_method='moment'), "transform_method 'moment' is not one of exact_minmax, minmax"),
    (dict(atss_topk=0), 'atss_topk 0'),
    (dict(classification_loss='varifocal'), "classification_loss 'varifocal' is not one of quality_focal, focal"),
    (dict(neck='pafpn'), "neck 'pafpn' is not one of bifpn, fpn"),
    (dict(neck=None), "neck None"),
    (dict(box_score_thresh=0.1), 'takes no option box_score_thresh; did you mean'),
])
def test_bad_options_are_refused_with_what_was_expected(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RepPointsV2Detector.build('dat_nano', 3, **SMALL, **kwargs)


def test_more_points_widen_the_deformable_kernel():
    head = _model(num_points=25).head
    assert head.cls_deform_conv.kernel_size == (5, 5) and head.points_init_out.out_channels == 50
    assert all(torch.isfinite(v) for v in _model(num_points=25)([torch.rand(3, 128, 128)],
                                                                _targets([(128, 128)])).values())


def test_the_head_has_the_official_configurations_parameters():
    head = RepPointsV2Detector.build('resnet18', 80).head
    conv_gn = 256 * 256 * 9 + 2 * 256
    corner_pool = 2 * (256 * 64 * 9 + 2 * 64) + (64 * 256 * 9 + 2 * 256) + 2 * (256 * 256 + 2 * 256)
    expected = (7 * conv_gn  # three classification, three localisation, one shared conv-GN-ReLU
                + 2 * corner_pool + 2 * (256 * 9 + 1) + 2 * (256 * 2 * 9 + 2)  # corners: pools, heat, offsets
                + (256 * 80 + 80) + (256 * 256 + 2 * 256)  # foreground logits and embedding
                + (256 * 256 * 9 + 256) + (256 * 18 + 18)  # initial points
                + 2 * 262 * 256 * 9 + (256 * 80 + 80) + (256 * 18 + 18))  # deformable classifier and refinement
    assert count_parameters(head) == expected == 7_210_442


@pytest.mark.parametrize('backbone, paper', [('resnet50', 42), ('swin_tiny_patch4_window7_224', 45)])
def test_the_default_configuration_matches_the_tables_in_parameters(backbone, paper):
    """Swin Transformer's Table 2 and EAPT Table IV: R-50 42M, Swin-T 45M (Swin Transformer's released config)."""
    model = RepPointsV2Detector.build(backbone, 80)
    assert count_parameters(model) / 1e6 == pytest.approx(paper, rel=0.03)


@pytest.mark.parametrize('backbone, fpn_millions, bifpn_millions', [('resnet50', 8.00, 11.41),
                                                                    ('swin_tiny_patch4_window7_224', 4.47, 10.19)])
def test_the_official_fpn_configuration_is_smaller_by_the_bifpn_less_the_fpn(backbone, fpn_millions, bifpn_millions):
    """reppoints_v2_r50_fpn_giou_1x (R-50 38.7M, Swin-T 39.2M): the same backbone and head, the FPN (P6 a 3x3 conv
    of C5) instead of the BiFPN."""
    fpn = RepPointsV2Detector.build(backbone, 80, neck='fpn', classification_loss='focal')
    bifpn = RepPointsV2Detector.build(backbone, 80)
    assert count_parameters(fpn.backbone.fpn) / 1e6 == pytest.approx(fpn_millions, abs=0.01)
    assert count_parameters(bifpn.backbone.fpn) / 1e6 == pytest.approx(bifpn_millions, abs=0.01)
    assert (count_parameters(bifpn) - count_parameters(fpn)
            == count_parameters(bifpn.backbone.fpn) - count_parameters(fpn.backbone.fpn))


def test_boxes_are_read_with_their_corners_in_order_so_giou_losses_stay_in_their_range(monkeypatch):
    """exact_minmax's two corner points may cross over; a box crossed on both axes would have a GIoU above 1 and
    an unbounded negative loss (what training from scratch found), so every box is read with its corners in order."""
    model = _model()
    points = model.points

    def scattered(raw, grid):  # point sets thrown far apart and across each other
        generator = torch.Generator().manual_seed(0)
        return points(raw, grid) + 300 * torch.randn(points(raw, grid).shape, generator=generator)
    monkeypatch.setattr(model, 'points', scattered)
    captured = {}
    decode = model.decode
    monkeypatch.setattr(model, 'decode', lambda outputs, grid: captured.setdefault('p', decode(outputs, grid)))
    losses = model([torch.rand(3, 128, 128)], _targets([(128, 128)]))
    for boxes in (captured['p'].boxes_init, captured['p'].boxes_refine):
        assert (boxes[..., 2:] >= boxes[..., :2]).all()
    assert 0 <= losses['loss_pts_init'] <= 2 and 0 <= losses['loss_pts_refine'] <= 2 * 2  # GIoU loss in [0, 2]
