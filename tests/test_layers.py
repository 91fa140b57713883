"""Shared layers: sampling (DAT Eq. (8)), position biases, windows, attention paths."""
import pytest
import torch

from deformvit.layers import (
    attention,
    deformable_relative_position_bias,
    pad_to_multiple,
    reference_points,
    relative_position_index,
    resize_fixed_position_bias,
    resize_relative_position_table,
    sample_bilinear,
    window_partition,
    window_region_mask,
)


def eq8_bilinear(z: torch.Tensor, py: float, px: float) -> torch.Tensor:
    """DAT Eq. (8) written out: sum over all locations of g(px, rx) g(py, ry) z[ry, rx]."""
    h, w, _ = z.shape
    g = lambda a, b: max(0.0, 1 - abs(a - b))  # noqa: E731
    return sum(g(px, rx) * g(py, ry) * z[ry, rx] for ry in range(h) for rx in range(w))


def test_sampling_is_eq8_bilinear_interpolation():
    z = torch.randn(5, 6, 3)
    points_px = torch.tensor([[0.3, 4.7], [2.0, 1.0], [3.9, 0.2], [1.5, 5.0]])  # (y, x) in pixels
    h, w = z.shape[:2]
    # align_corners=True: pixel p <-> normalised 2 p / (size - 1) - 1
    norm = torch.stack([points_px[:, 0] / (h - 1) * 2 - 1, points_px[:, 1] / (w - 1) * 2 - 1], -1)
    out = sample_bilinear(z.permute(2, 0, 1)[None], norm.view(1, 1, -1, 2))[0, :, 0].t()  # (P, C)
    expected = torch.stack([eq8_bilinear(z, py.item(), px.item()) for py, px in points_px])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_reference_points_are_uniform_cell_centres_in_minus_one_one():
    ref = reference_points(4, 6)
    assert ref.shape == (4, 6, 2)
    assert torch.allclose(ref[0, 0], torch.tensor([-1 + 1 / 4, -1 + 1 / 6]))
    assert torch.allclose(ref[-1, -1], torch.tensor([1 - 1 / 4, 1 - 1 / 6]))
    assert torch.allclose(ref[1:, :, 0] - ref[:-1, :, 0], torch.full((3, 6), 2 / 4))


def test_relative_position_index_covers_table_and_is_translation_invariant():
    index = relative_position_index((3, 4))
    assert index.shape == (12, 12)
    assert index.min() == 0 and index.max() == (2 * 3 - 1) * (2 * 4 - 1) - 1
    # token (0,0)->(1,1) and (1,2)->(2,3) share the same displacement
    assert index[0, 1 * 4 + 1] == index[1 * 4 + 2, 2 * 4 + 3]
    assert torch.all(index.diagonal() == index[0, 0])


def test_deformable_bias_samples_the_table_at_halved_displacements():
    heads, groups = 4, 2
    table = torch.randn(heads, 9, 9)
    queries = reference_points(3, 3).reshape(-1, 2)
    keys = (torch.rand(2 * groups, 5, 2) * 2 - 1)
    bias = deformable_relative_position_bias(table, queries, keys, groups)
    assert bias.shape == (2, heads, 9, 5)
    # head 3 belongs to group 1; check one (query, key) pair of batch 1 against Eq. (8)
    b, head, qi, ki = 1, 3, 7, 2
    disp = (queries[qi] - keys[b * groups + 1, ki]) * 0.5  # in [-1, 1]
    py, px = ((disp + 1) / 2 * 8).tolist()  # align_corners=True onto the 9x9 table
    expected = eq8_bilinear(table[head][..., None], py, px)[0]
    torch.testing.assert_close(bias[b, head, qi, ki], expected, rtol=1e-5, atol=1e-5)


def test_window_partition_orders_tokens_row_major_per_window():
    x = torch.arange(2 * 4 * 6).float().view(2, 4, 6, 1)
    windows = window_partition(x, (2, 3))
    assert windows.shape == (2 * 4, 6, 1)
    assert windows[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]


def test_pad_to_multiple_pads_bottom_right_only():
    x = torch.ones(1, 5, 9, 2)
    y = pad_to_multiple(x, (7, 7))
    assert y.shape == (1, 7, 14, 2)
    assert y[:, :5, :9].eq(1).all() and y[:, 5:].eq(0).all() and y[:, :, 9:].eq(0).all()


def test_shift_mask_matches_swin_regions_and_masks_padding():
    mask = window_region_mask((14, 14), (14, 14), (7, 7), (4, 4), torch.device('cpu'))
    assert mask.shape == (4, 49, 49)
    assert mask[0].eq(0).all()  # top-left window of the shifted map is one region
    assert mask[3].ne(0).any()
    assert window_region_mask((14, 14), (14, 14), (7, 7), (0, 0), torch.device('cpu')) is None
    padded = window_region_mask((14, 14), (10, 12), (7, 7), (0, 0), torch.device('cpu'))
    # window 3 holds rows 7..13 x cols 7..13: real tokens are rows 7..9, cols 7..11
    real = torch.zeros(7, 7, dtype=torch.bool)
    real[:3, :5] = True
    real = real.flatten()
    assert padded[3][real][:, ~real].eq(-100).all() and padded[3][real][:, real].eq(0).all()


@pytest.mark.parametrize('bias', [False, True])
def test_fused_attention_equals_explicit_softmax(bias):
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    b = torch.randn(1, 4, 10, 10) if bias else None
    torch.testing.assert_close(attention(q, k, v, b, fused=True), attention(q, k, v, b, fused=False),
                               rtol=1e-5, atol=1e-5)


def test_resize_tables_keep_shape_conventions_and_identity():
    swin = torch.randn(13 * 13, 3)
    assert resize_relative_position_table(swin, (23, 23)).shape == (23 * 23, 3)
    assert resize_relative_position_table(swin, (13, 13)) is swin
    dat = torch.randn(4, 27, 27)
    assert resize_relative_position_table(dat, (47, 47)).shape == (4, 47, 47)
    fixed = torch.randn(2, 14 * 14, 7 * 7)
    torch.testing.assert_close(resize_fixed_position_bias(fixed, (14, 14), (7, 7), (14, 14), (7, 7)), fixed)
    assert resize_fixed_position_bias(fixed, (14, 14), (7, 7), (10, 12), (5, 6)).shape == (2, 120, 30)
    with pytest.raises(ValueError, match='not square'):
        resize_relative_position_table(torch.randn(12, 2), (3, 3))
