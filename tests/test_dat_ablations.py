"""Every ablation of DAT Sec. 4.4 / Appendix A-B builds, runs at several sizes and back-propagates."""
import pytest
import timm
import torch

from deformvit.models.dat import DeformableAttention, DeformableDetrAttention, SpatialReductionAttention

ABLATIONS = {
    'table6-no-offsets-no-pe': dict(use_offsets=False, position_bias='none'),
    'table6-no-offsets-relative': dict(use_offsets=False),
    'table6-offsets-no-pe': dict(position_bias='none'),
    'table6-fixed-pe': dict(position_bias='fixed'),
    'table6-dwconv-pe': dict(position_bias='dwconv'),
    'table6-pvt-sra-first-two-stages': dict(stage_spec=('PP', 'PP', 'LDLDLD', 'LD')),
    'table7-all-stages': dict(deformable_stages=(0, 1, 2, 3)),
    'table7-stages-2-4': dict(deformable_stages=(1, 2, 3)),
    'table7-stage-4': dict(deformable_stages=(3,)),
    'table7-swin': dict(deformable_stages=()),
    'fig4-s0': dict(offset_range_factor=0.),
    'fig4-s1': dict(offset_range_factor=1.),
    'fig4-s4': dict(offset_range_factor=4.),
    'fig4-s8': dict(offset_range_factor=8.),
    'fig4-s16': dict(offset_range_factor=16.),
    'unbounded-offsets': dict(offset_range_factor=None),
    'table8-ddetr-16': dict(stage_spec=('LS', 'LS', 'LMLMLM', 'LM'), ddetr_points=16),
    'table8-ddetr-196-49': dict(stage_spec=('LS', 'LS', 'LMLMLM', 'LM'), ddetr_points=(16, 16, 196, 49)),
    'table8-dat-49-keys': dict(offset_stride=(4, 2, 2, 1)),
    'appendix-b-conv-patches': dict(conv_patch_embed=True),
}


@pytest.mark.parametrize('kwargs', ABLATIONS.values(), ids=ABLATIONS.keys())
def test_ablation_builds_runs_any_size_and_backpropagates(kwargs):
    model = timm.create_model('dat_tiny', num_classes=5, **kwargs)
    for size in ((64, 96), (224, 224)):
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]}'
    offset_grads = [p.grad.abs().sum() for n, p in model.named_parameters()
                    if '.offset_net.' in n or '.sampling_offsets.' in n]
    if kwargs.get('offset_range_factor') == 0.:
        # s = 0: Delta p = 0 * tanh(.) = 0, so the offset networks learn nothing
        assert offset_grads and all(g == 0 for g in offset_grads)
    else:
        assert all(g > 0 for g in offset_grads)


def test_offset_range_factor_bounds_offsets_as_in_fig4():
    for s in (0., 1., 4., 16.):
        model = timm.create_model('dat_tiny', offset_range_factor=s).eval()
        with torch.no_grad():
            for attn in (a for *_, a in model.deformable_blocks()):
                attn.offset_net.conv_proj.weight.mul_(100)  # saturate tanh
        _, records = model.forward_sampling_points(torch.randn(1, 3, 224, 224))
        for r in records:
            hk = r.points.shape[2]
            offset = (r.points - r.reference).abs().amax()
            assert offset <= s / hk + 1e-6
            if s:
                assert offset > 0.9 * s / hk  # saturated: the full s x s region is reached


def test_no_offsets_samples_at_reference_points_without_offset_network():
    model = timm.create_model('dat_tiny', use_offsets=False).eval()
    _, records = model.forward_sampling_points(torch.randn(1, 3, 224, 224))
    assert all(torch.equal(r.points, r.reference) for r in records)
    assert all(attn.offset_net is None for *_, attn in model.deformable_blocks())


def test_block_types_are_placed_as_requested():
    model = timm.create_model('dat_tiny', stage_spec=('PP', 'PP', 'LMLDLD', 'LD'))
    kinds = [[type(b.attn) for b in stage.blocks] for stage in model.stages]
    assert kinds[0] == [SpatialReductionAttention] * 2
    assert kinds[2][1] is DeformableDetrAttention and kinds[2][3] is DeformableAttention
    table7 = timm.create_model('dat_tiny', deformable_stages=(0, 1, 2, 3))
    assert table7.stage_spec == ('LD', 'LD', 'LDLDLD', 'LD')
    # Table 7's budget: 196-key grids in stages 1-3 (r = 4, 2, 1), 49 in stage 4
    grids = [attn.key_grid_size(attn.feature_size) for *_, attn in table7.deformable_blocks()]
    assert grids[0] == (14, 14) and grids[1] == (14, 14) and grids[-1] == (7, 7)


@pytest.mark.parametrize('kwargs, message', [
    (dict(stage_spec=('LS', 'LX', 'LD', 'LD')), 'stage_spec entry'),
    (dict(stage_spec=('LS', 'LS', 'LD')), 'one per stage'),
    (dict(position_bias='learned'), 'position_bias'),
    (dict(groups=(1, 2, 5, 6)), 'heads by groups'),
    (dict(offset_range_factor=-1.), 'offset_range_factor'),
])
def test_bad_ablation_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('dat_tiny', **kwargs)
