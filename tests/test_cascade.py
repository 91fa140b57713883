"""Cascade Mask R-CNN and Hybrid Task Cascade: the stages' targets and coders, the detached refinement,
the averaged scores, the weighted losses, HTC's interleaving, mask information flow and semantic branch,
checkpoints, and the sizes of DAT Table 4b and EAPT Tables IV-V."""
import os

import pytest
import torch
import torch.nn as nn

from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.errors import UsageError
from deformvit.tasks import build_detector, load_model
from deformvit.tasks.detection.cascade import soft_nms
from deformvit.tasks.detection.htc import SemanticHead
from deformvit.tools.complexity import count_parameters

SMALL = dict(min_size=128, max_size=128, fpn_channels=32, anchor_sizes=(16, 32, 64, 128, 256),
             representation_size=64)
HTC_SMALL = dict(SMALL, semantic_classes=4)


def _targets(sizes, semantic: bool = False) -> list:
    targets = []
    for i, (h, w) in enumerate(sizes):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 12:70, 10 + i:60] = 1
        masks[1, 20:50, 70:110] = 1
        target = dict(boxes=torch.tensor([[10.0 + i, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                      labels=torch.tensor([1, 2]), masks=masks)
        if semantic:
            target['semantic'] = masks[0].long() + 2 * masks[1].long()
        targets.append(target)
    return targets


def _model(name='cascade_mask_rcnn', **kwargs):
    torch.manual_seed(0)
    return build_detector(name, 'dat_nano', 3, **dict(HTC_SMALL if name.startswith('htc') else SMALL, **kwargs))


# ---- the stages ----------------------------------------------------------------------------------

def test_stages_have_the_papers_thresholds_coders_and_weights():
    heads = _model().roi_heads
    assert [s.iou_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [s.stds for s in heads.stages] == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                              (0.033, 0.033, 0.067, 0.067)]
    assert [s.loss_weight for s in heads.stages] == [1.0, 0.5, 0.25]
    assert all(s.class_agnostic and s.bbox_pred.out_features == 4 for s in heads.stages)
    # 4conv1fc: four 3x3 convolutions with BatchNorm, then one fully connected layer
    convs = [m for m in heads.stages[0].head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in heads.stages[0].head.modules()) == 4
    assert sum(isinstance(m, nn.Linear) for m in heads.stages[0].head.modules()) == 1
    two_fc = _model(box_head='2fc').roi_heads.stages[0].head
    assert sum(isinstance(m, nn.Linear) for m in two_fc.modules()) == 2
    assert not any(isinstance(m, nn.Conv2d) for m in two_fc.modules())


def test_each_stage_labels_rois_with_its_own_iou_threshold():
    heads = _model().roi_heads
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoU with the ground truth: 0.55 and 0.65 (x2 chosen so that area / 10000 is the IoU)
    proposals = [torch.tensor([[0.0, 0.0, 55.0, 100.0], [0.0, 0.0, 65.0, 100.0]])]
    targets = [dict(boxes=gt, labels=torch.tensor([2]))]
    expected = {0: [2, 2], 1: [0, 2], 2: [0, 0]}
    for t, stage in enumerate(heads.stages):
        samples = heads.sample(stage, proposals, targets)
        labels = dict(zip(map(tuple, samples.boxes[0].tolist()), samples.labels[0].tolist()))
        assert [labels[(0.0, 0.0, 55.0, 100.0)], labels[(0.0, 0.0, 65.0, 100.0)]] == expected[t]
        assert labels[(0.0, 0.0, 100.0, 100.0)] == 2  # the ground truth is added as a proposal
        assert samples.from_ground_truth[0].sum() == 1


def test_stage_coders_normalise_deltas_by_the_stages_standard_deviations():
    proposal, gt = torch.tensor([[10.0, 20.0, 50.0, 60.0]]), torch.tensor([[12.0, 18.0, 54.0, 66.0]])
    # (dx, dy, dw, dh) of mmdetection's DeltaXYWHBBoxCoder, before normalisation
    raw = torch.tensor([[(33.0 - 30.0) / 40.0, (42.0 - 40.0) / 40.0, torch.log(torch.tensor(42 / 40)),
                         torch.log(torch.tensor(48 / 40))]])
    for stage in _model().roi_heads.stages:
        encoded = stage.coder.encode_single(gt, proposal)
        torch.testing.assert_close(encoded, raw / torch.tensor(stage.stds))
        torch.testing.assert_close(stage.decode(encoded, proposal), gt)


def test_refinement_is_detached_drops_the_added_ground_truth_and_feeds_the_next_stage():
    model = _model()
    heads = model.roi_heads
    stage = heads.stages[0]
    proposals = [torch.tensor([[5.0, 5.0, 60.0, 70.0], [65.0, 15.0, 115.0, 55.0], [0.0, 0.0, 30.0, 30.0]])]
    targets = _targets([(128, 128)])
    samples = heads.sample(stage, proposals, targets)
    features = model.backbone(torch.rand(1, 3, 128, 128))
    logits, deltas = stage(heads.box_features(0, features, samples.boxes, [(128, 128)]))
    refined = heads.refine(stage, samples, logits, deltas, [(128, 128)])
    assert not refined[0].requires_grad
    assert len(refined[0]) == len(samples.boxes[0]) - int(samples.from_ground_truth[0].sum())
    expected = stage.decode(deltas, samples.boxes[0])[~samples.from_ground_truth[0]].clamp(0, 128)
    torch.testing.assert_close(refined[0], expected.detach())
    # the second stage's loss sends no gradient to the first stage's regressor
    samples_1 = heads.sample(heads.stages[1], refined, targets)
    logits_1, deltas_1 = heads.stages[1](heads.box_features(1, features, samples_1.boxes, [(128, 128)]))
    sum(heads.stage_losses(heads.stages[1], samples_1, logits_1, deltas_1, targets)).backward()
    assert stage.bbox_pred.weight.grad is None
    assert heads.stages[1].bbox_pred.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('average', ['logits', 'probabilities'])
def test_test_time_scores_average_the_three_classifiers(average):
    model = _model(score_average=average, box_score_thresh=0.0, box_detections_per_img=1000)
    model.eval()
    heads = model.roi_heads
    seen = []
    for stage in heads.stages:
        stage.register_forward_hook(lambda module, args, output: seen.append(output[0].detach()))
    features = model.backbone(torch.rand(1, 3, 128, 128))
    proposals = [torch.tensor([[10.0, 10.0, 60.0, 70.0]])]
    detection = heads.detect(features, proposals, [(128, 128)])[0]
    assert len(seen) == 3
    if average == 'logits':
        expected = torch.stack(seen).mean(0).softmax(-1)
    else:
        expected = torch.stack([s.softmax(-1) for s in seen]).mean(0)
    for label, score in zip(detection['labels'], detection['scores']):
        torch.testing.assert_close(score, expected[0, label])
    assert not torch.allclose(seen[0].softmax(-1), expected)


def test_stage_losses_are_weighted_one_half_and_a_quarter():
    images = [torch.rand(3, 128, 128)]
    losses = {}
    for weights in ((1.0, 1.0, 1.0), (1.0, 0.5, 0.25)):
        model = _model(stage_weights=weights)
        torch.manual_seed(1)
        losses[weights] = model(images, _targets([(128, 128)]))
    plain, weighted = losses[(1.0, 1.0, 1.0)], losses[(1.0, 0.5, 0.25)]
    for t, weight in enumerate((1.0, 0.5, 0.25)):
        for part in ('loss_classifier', 'loss_box_reg', 'loss_mask'):
            torch.testing.assert_close(weighted[f's{t}_{part}'], weight * plain[f's{t}_{part}'])


@pytest.mark.parametrize('name', ['cascade_mask_rcnn', 'htc', 'htc++'])
def test_a_training_step_gives_finite_losses_and_gradients_on_every_head(name):
    model = _model(name)
    sizes = [(128, 128), (96, 120)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes, semantic=name != 'cascade_mask_rcnn'))
    expected = {'loss_objectness', 'loss_rpn_box_reg'} | {f's{t}_loss_{p}' for t in range(3)
                                                          for p in ('classifier', 'box_reg', 'mask')}
    if name != 'cascade_mask_rcnn':
        expected.add('loss_semantic')
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_htc_without_semantic_maps_trains_without_the_semantic_loss():
    model = _model('htc')
    losses = model([torch.rand(3, 128, 128)], _targets([(128, 128)]))
    assert losses['loss_semantic'] == 0
    sum(losses.values()).backward()  # every parameter takes part (DDP needs no unused-parameter search)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('name', ['cascade_mask_rcnn', 'htc', 'htc++'])
def test_eval_gives_torchvision_detections_with_pasted_masks(name):
    model = _model(name, box_score_thresh=0.0)
    model.eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 128, 128), torch.rand(3, 80, 112)])
    for output, (h, w) in zip(outputs, [(128, 128), (80, 112)]):
        n = len(output['boxes'])
        assert set(output) == {'boxes', 'labels', 'scores', 'masks'} and n > 0
        assert output['masks'].shape == (n, 1, h, w) and 0 <= output['masks'].min() <= output['masks'].max() <= 1
        assert output['labels'].min() >= 1 and output['labels'].max() <= 3
        assert (output['boxes'][:, 2] <= w).all() and (output['boxes'][:, 3] <= h).all()
        assert (output['scores'][:-1] >= output['scores'][1:]).all() or name != 'htc++'


def test_mask_heads_per_stage_or_only_the_last():
    assert _model().roi_heads.mask_stages == (0, 1, 2)
    last = _model(mask_stages='last')
    assert last.roi_heads.mask_stages == (2,) and len(last.roi_heads.mask_heads) == 1
    losses = last([torch.rand(3, 128, 128)], _targets([(128, 128)]))
    assert 's2_loss_mask' in losses and 's0_loss_mask' not in losses


# ---- HTC -----------------------------------------------------------------------------------------

def test_htc_mask_information_flow_reaches_later_stages_only():
    heads = _model('htc').roi_heads
    pooled = torch.rand(2, 32, 14, 14)
    before = [heads.mask_logits(t, pooled) for t in range(3)]
    with torch.no_grad():
        heads.mask_heads[0].convs[0][0].weight.mul_(2)
    after = [heads.mask_logits(t, pooled) for t in range(3)]
    assert not torch.allclose(before[0], after[0])
    assert not torch.allclose(before[2], after[2])  # stage 3 reads stage 1's features
    cascade = _model().roi_heads
    before = cascade.mask_logits(2, pooled)
    with torch.no_grad():
        cascade.mask_heads[0].convs[0][0].weight.mul_(2)
    torch.testing.assert_close(cascade.mask_logits(2, pooled), before)  # no flow in Cascade Mask R-CNN


def test_htc_masks_train_on_the_boxes_their_stage_regressed(monkeypatch):
    model = _model('htc')
    heads = model.roi_heads
    refined, mask_boxes = [], []
    original_refine, original_mask_loss = type(heads).refine, type(heads).mask_loss

    def refine(self, *args):
        out = original_refine(self, *args)
        refined.append(out)
        return out

    def mask_loss(self, stage, features, samples, targets, shapes):
        mask_boxes.append(samples.boxes)
        return original_mask_loss(self, stage, features, samples, targets, shapes)
    monkeypatch.setattr(type(heads), 'refine', refine)
    monkeypatch.setattr(type(heads), 'mask_loss', mask_loss)
    model([torch.rand(3, 128, 128)], _targets([(128, 128)]))
    assert len(refined) == len(mask_boxes) == 3
    for boxes, mask in zip(refined, mask_boxes):
        regressed = {tuple(b) for b in boxes[0].tolist()} | {(10.0, 12.0, 60.0, 70.0), (70.0, 20.0, 110.0, 50.0)}
        assert {tuple(b) for b in mask[0].tolist()} <= regressed


def test_semantic_loss_reads_resized_padded_maps_and_ignores_255():
    head = SemanticHead(channels=8, num_classes=3, loss_weight=0.2)
    logits = torch.zeros(1, 3, 4, 6, requires_grad=True)  # stride 8 of a 32x48 padded batch
    semantic = torch.zeros(16, 24, dtype=torch.int64)  # resized 2x to 32x48 by the transform
    semantic[:, 12:] = 255
    loss = head.loss(logits, [semantic], [(32, 48)], (32, 48))
    torch.testing.assert_close(loss, 0.2 * torch.log(torch.tensor(3.0)))
    loss.backward()
    assert (logits.grad[..., 3:] == 0).all() and (logits.grad[..., :3] != 0).all()
    with pytest.raises(ValueError, match='outside 0..2'):
        head.loss(logits, [torch.full((16, 24), 7)], [(32, 48)], (32, 48))
    assert head.loss(logits, [torch.full((16, 24), 255)], [(32, 48)], (32, 48)) == 0


def test_htc_plus_plus_has_global_attention_on_the_last_level_and_soft_nms():
    model = _model('htc++')
    assert model.roi_heads.nms == 'soft'
    attention = model.backbone.body.attention
    assert attention.block.attn.num_heads == model.backbone.body.feature_info.channels()[-1] // 32 or \
        attention.block.attn.num_heads == 1
    plain = _model('htc')
    assert count_parameters(model) > count_parameters(plain)


def test_soft_nms_decays_overlapping_scores_within_a_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 9.0], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep, decayed = soft_nms(boxes, scores, torch.tensor([1, 1, 2, 1]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2, 3, 1]  # box 1 overlaps box 0 (IoU 0.8): 0.8 x (1 - 0.8) = 0.16
    torch.testing.assert_close(decayed, torch.tensor([0.9, 0.7, 0.6, 0.16]))


# ---- options, checkpoints, sizes -----------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(box_head='3fc'), "box_head '3fc' is not one of 4conv1fc, 2fc"),
    (dict(stage_weights=(1, 'half', 0.25)), 'non-negative loss weights'),
    (dict(class_agnostic='yes'), 'true or false'),
    (dict(stage_ious=(0.5, 0.6)), 'one per stage'),
    (dict(stage_ious=(0.5, 0.6, 1.5)), 'in \\(0, 1\\)'),
    (dict(stage_stds=((0.1, 0.1, 0.2),) * 3), 'four positive numbers'),
    (dict(mask_stages='first'), 'mask_stages'),
    (dict(box_loss='l2'), 'box_loss'),
    (dict(nms='fast'), 'nms'),
    (dict(box_loss_weight=2), 'takes no option box_loss_weight; did you mean box_loss'),
])
def test_bad_cascade_options_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        build_detector('cascade_mask_rcnn', 'dat_nano', 3, **SMALL, **kwargs)


def test_options_of_another_framework_are_refused_not_ignored():
    with pytest.raises(UsageError, match='MaskRCNNDetector takes no option box_loss'):
        build_detector('mask_rcnn', 'dat_nano', 3, **SMALL, box_loss='giou')


@pytest.mark.parametrize('args, message', [
    (['--detector', 'mask_rcnn', '--set', 'detector_kwargs={box_loss: giou}'], 'takes no option box_loss'),
    (['--detector', 'htc', '--set', 'detector_kwargs={semantic_classes: 0}'], 'semantic_classes 0'),
    (['--detector', 'htc', '--set', 'detector_kwargs={semantic_classes: many}'], "semantic_classes 'many'"),
    (['--detector', 'cascade_mask_rcnn', '--set', 'detector_kwargs={stage_ious: [0.5]}'], 'one per stage'),
    (['--detector', 'cascade_mask_rcnn', '--set', 'crop=1.5'], 'crop'),
    (['--detector', 'retinanet', '--set', 'crop=-1'], 'crop'),
])
def test_careless_cascade_settings_stop_before_any_work(refused_before_work, args, message):
    refused_before_work(['detect', 'train', *args], message)


def test_htc_refuses_cascade_only_options():
    with pytest.raises(UsageError, match='every stage'):
        build_detector('htc', 'dat_nano', 3, **SMALL, mask_stages='last')
    with pytest.raises(UsageError, match='positive number of heads'):
        build_detector('htc++', 'dat_nano', 3, **SMALL, global_attention_heads=0)


@pytest.mark.parametrize('name', ['cascade_mask_rcnn', 'htc++'])
def test_checkpoints_rebuild_through_the_one_loader(tmp_path, name):
    model = _model(name, box_loss='giou')
    model.eval()
    path = tmp_path / 'detector.safetensors'
    kwargs = {k: v for k, v in model.config.items() if k != 'detector'}
    save_safetensors(model.state_dict(), str(path), metadata_for(name, kwargs, ['a', 'b', 'c'], 0, task='detect'))
    loaded = load_model(str(path))
    assert type(loaded.model) is type(model) and loaded.model.roi_heads.box_loss == 'giou'
    image = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        for a, b in zip(model(image), loaded.model.eval()(image)):
            torch.testing.assert_close(a['boxes'], b['boxes'])
            torch.testing.assert_close(a['masks'], b['masks'])


@pytest.mark.parametrize('backbone, paper, tolerance', [
    ('resnet50', 82, 0.03),  # EAPT Table IV
    ('swin_tiny_patch4_window7_224', 86, 0.03),  # DAT Table 4b, EAPT Table IV
    ('dat_tiny', 86, 0.03), ('dat_small', 107, 0.03), ('dat_base', 145, 0.03),  # DAT Table 4b
])
def test_cascade_mask_rcnn_matches_the_tables_in_parameters(backbone, paper, tolerance):
    params = count_parameters(build_detector('cascade_mask_rcnn', backbone, 80)) / 1e6
    assert params == pytest.approx(paper, rel=tolerance)


def test_eapt_small_cascade_adds_to_swin_t_what_its_backbone_adds():
    """EAPT Table IV's EAPT-S cascade (93M) is 7M above Swin-T's (86M) while Table III puts the EAPT-S backbone
    10M above Swin-T (39M vs 29M): the heads are the same, so ours differs by exactly the backbones' difference."""
    eapt = build_detector('cascade_mask_rcnn', 'eapt_small', 80)
    swin = build_detector('cascade_mask_rcnn', 'swin_tiny_patch4_window7_224', 80)
    difference = count_parameters(eapt) - count_parameters(swin)
    backbones = count_parameters(eapt.backbone.body) - count_parameters(swin.backbone.body)
    lateral = (count_parameters(eapt.backbone.fpn) - count_parameters(swin.backbone.fpn)
               + count_parameters(eapt.backbone.norms) - count_parameters(swin.backbone.norms))
    assert difference == backbones + lateral
    assert count_parameters(eapt) / 1e6 == pytest.approx(93, rel=0.05)


@pytest.mark.parametrize('backbone, paper', [('swin_base_patch4_window7_224', 160), ('eapt_medium', 182)])
def test_htc_plus_plus_matches_eapt_table_5_in_parameters(backbone, paper):
    assert count_parameters(build_detector('htc++', backbone, 80)) / 1e6 == pytest.approx(paper, rel=0.03)


# ---- the shared loop on two processes ------------------------------------------------------------

def test_two_process_cascade_and_htc_runs(tmp_path, two_process_detection):
    from deformvit.data.scenes import write_digit_scenes
    scenes = write_digit_scenes(tmp_path / 'digits', n_train=8, n_val=4)
    for detector in ('cascade_mask_rcnn', 'htc'):
        out = tmp_path / detector
        two_process_detection(scenes['coco'], out, detector, '--set', 'representation_size=64',
                              *(['--set', 'detector_kwargs={semantic_classes: 11}'] if detector == 'htc' else []))
        assert load_model(str(out / 'last.safetensors')).model.has_masks()


@pytest.mark.parametrize('backbone, name', [('resnet18', 'cascade_mask_rcnn'),
                                            ('swin_tiny_patch4_window7_224', 'htc++')])
def test_the_cascades_take_any_timm_pyramid_backbone_at_any_size(backbone, name):
    torch.manual_seed(0)
    model = build_detector(name, backbone, 3, min_size=200, max_size=336, fpn_channels=32, representation_size=64,
                           **({'semantic_classes': 4} if name.startswith('htc') else {}))
    sizes = [(190, 320), (150, 200)]
    losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes, semantic=name.startswith('htc')))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        output = model([torch.rand(3, 190, 320)])[0]
    assert output['masks'].shape[-2:] == (190, 320)


def test_a_bfloat16_autocast_step_keeps_float32_boxes_and_finite_losses():
    model = _model('htc')
    sizes = [(128, 128)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model([torch.rand(3, *s) for s in sizes], _targets(sizes, semantic=True))
        features = model.backbone(torch.rand(1, 3, 128, 128))
        logits, deltas = model.roi_heads.stages[0](model.roi_heads.box_features(
            0, features, [torch.tensor([[10.0, 10.0, 60.0, 70.0]])], [(128, 128)]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert logits.dtype == deltas.dtype == torch.float32  # decoded onto pixels, which bf16 would round to 8 px


def test_detect_commands_train_evaluate_and_predict_with_htc(tmp_path, capsys):
    from deformvit.cli import main
    from deformvit.data.scenes import write_digit_scenes
    scenes = write_digit_scenes(tmp_path / 'digits', n_train=8, n_val=4)
    out = tmp_path / 'run'
    main(['detect', 'train', '--data', scenes['coco'], '--output', str(out), '--detector', 'htc', '--epochs', '1',
          '--backbone', 'dat_nano', '--workers', '0', '--batch-size', '4', '--set', 'min_size=128',
          '--set', 'max_size=128', '--set', 'fpn_channels=32', '--set', 'representation_size=64',
          '--set', 'detector_kwargs={semantic_classes: 11}', '--set', 'eval_batch_size=4'])
    printed = capsys.readouterr().out
    assert 'no semantic maps' not in printed and 'mask AP' in printed
    main(['detect', 'eval', str(out / 'last.safetensors'), '--data', scenes['coco'], '--workers', '0'])
    assert 'mask AP' in capsys.readouterr().out
    main(['detect', 'predict', str(out / 'last.safetensors'), os.path.join(scenes['coco'], 'val'),
          '--output', str(tmp_path / 'pred'), '--score-threshold', '0.0'])
    assert len(list((tmp_path / 'pred').glob('*.png'))) == 4
