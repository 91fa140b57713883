"""Position encodings of EAPT Sec. III-C and Table VIII: MCMD's equations and properties, the baselines."""
import math

import pytest
import torch

from deformvit.layers import MCMD, FloaterEncoding, LearnedEmbedding, SinusoidalEncoding, gaussian_descriptors


def test_gaussian_descriptor_is_eq9_10_written_out():
    size, length, width = 5, 12, 0.7
    table = gaussian_descriptors(size, length, width, dtype=torch.float64)
    for i in range(size):
        centre = (i + 0.5) * length / size  # (b + 0.5) * hwc / p^3 with patch length hwc / p^2
        sigma = width * length / size
        for t in range(length):
            expected = math.exp(-((t + 0.5) - centre) ** 2 / (2 * sigma ** 2))
            assert table[i, t].item() == pytest.approx(expected, rel=1e-12)


def test_mcmd_is_amplitude_times_mixed_descriptors_eq11_12():
    x = torch.randn(2, 4, 6, 24)
    mcmd = MCMD((1.0, 2.0))
    p = mcmd(x)
    g_x = gaussian_descriptors(4, 24, 1.0)
    g_y = gaussian_descriptors(6, 24, 2.0)
    for i, j in ((0, 0), (3, 5), (2, 1)):
        a = x[1, i, j].sum() * 1 / 24  # a_ij = p^2 / hwc * Sum(V_ij), one token per patch
        torch.testing.assert_close(p[1, i, j], a * (g_x[i] + g_y[j]))


def test_mcmd_is_data_driven_and_parameter_free():
    mcmd = MCMD()
    x = torch.randn(1, 3, 3, 16)
    torch.testing.assert_close(mcmd(3 * x), 3 * mcmd(x))
    assert sum(p.numel() for p in mcmd.parameters()) == 0


def test_mcmd_is_symmetrical_and_translation_carries_relative_position():
    """Sec. III-C-4: mirrored positions get mirrored descriptors; a shift of t' rows shifts the
    descriptor by t' centre spacings."""
    size, length = 8, 32  # 4 channels per position
    g = gaussian_descriptors(size, length, 1.0, dtype=torch.float64)
    for i in range(size):
        torch.testing.assert_close(g[size - 1 - i], g[i].flip(0))
    spacing = length // size
    for i in range(size - 1):
        torch.testing.assert_close(g[i + 1, spacing:], g[i, :-spacing])


def test_mcmd_needs_distinct_widths_to_tell_transposed_positions_apart():
    x = torch.ones(1, 5, 5, 40)
    p = MCMD((1.0, 2.0))(x)
    assert not torch.allclose(p[0, 1, 3], p[0, 3, 1])
    with pytest.raises(ValueError, match='c_x != c_y'):
        MCMD((1.5, 1.5))
    with pytest.raises(ValueError, match='positive'):
        MCMD((0.0, 1.0))


@pytest.mark.parametrize('shape', [(1, 1, 1, 8), (1, 7, 3, 96), (2, 56, 56, 96), (1, 2, 9, 5)])
def test_mcmd_is_inductive_any_number_and_length_of_patches(shape):
    p = MCMD()(torch.randn(shape))
    assert p.shape == shape and torch.isfinite(p).all()


def test_sinusoidal_encoding_is_vaswani_over_the_flattened_index():
    x = torch.zeros(1, 3, 4, 10)
    pe = SinusoidalEncoding()(x)
    for i, j, c in ((0, 0, 0), (2, 3, 4), (1, 2, 7)):
        pos = i * 4 + j
        rate = 10000 ** (-(c - c % 2) / 10)
        expected = math.sin(pos * rate) if c % 2 == 0 else math.cos(pos * rate)
        assert pe[i, j, c].item() == pytest.approx(expected, abs=1e-6)


def test_learned_embedding_is_its_table_at_its_size_and_resamples_otherwise():
    emb = LearnedEmbedding((4, 4), 8)
    assert torch.equal(emb(torch.zeros(1, 4, 4, 8)), emb.pos_embed[0])
    assert emb(torch.zeros(1, 7, 5, 8)).shape == (7, 5, 8)


def test_floater_encoding_solves_its_ode_and_extends_to_any_length():
    torch.manual_seed(0)
    floater = FloaterEncoding(6, hidden=8, step=0.1)
    with torch.no_grad():
        for p in floater.parameters():
            p.normal_(0, 0.5)
    trajectory = floater.trajectory(12)
    # a much finer explicit Euler integration of the same dynamics agrees with the RK4 steps
    p, t, fine = floater.initial.detach(), torch.zeros(1), 200
    with torch.no_grad():
        for _ in range(11 * fine):
            p = p + 0.1 / fine * floater.derivative(t, p)
            t = t + 0.1 / fine
    torch.testing.assert_close(trajectory[-1].detach(), p, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(floater.trajectory(20)[:12], trajectory)  # inductive: longer sequences extend
    trajectory.sum().backward()
    assert floater.dynamics[0].weight.grad.abs().sum() > 0 and floater.initial.grad.abs().sum() > 0
