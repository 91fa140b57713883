"""MCMD's amplitude a_ij (EAPT Eq. (12)): read from the input image's patches (Sec. III-C-2, Fig. 2),
so the position encoding acts from the first step; the other readings stay selectable."""
import pytest
import timm
import torch

from deformvit.models.eapt import patch_means


def _relative_change(amplitude: str, size: int = 224, name: str = 'eapt_small') -> float:
    """How much MCMD changes the logits of ``name`` on the same weights: |with - without| / |without|."""
    torch.manual_seed(0)
    with_mcmd = timm.create_model(name, mcmd_amplitude=amplitude).eval()
    without = timm.create_model(name, mcmd_amplitude=amplitude, position_encoding='none').eval()
    assert without.load_state_dict(with_mcmd.state_dict()) is not None  # MCMD has no parameters
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        a, b = with_mcmd(images), without(images)
    return ((a - b).norm() / b.norm()).item()


def test_mcmd_acts_from_the_first_step_with_the_paper_amplitude():
    assert _relative_change('patches') > 1e-3  # the default: the image patches under each position
    assert _relative_change('input') > 1e-3
    # the attention input's mean is a LayerNorm output's, zero at initialisation: MCMD is inert
    assert _relative_change('normed') < 1e-5


def test_patch_amplitudes_are_the_mean_of_the_image_under_each_position():
    images = torch.randn(2, 3, 70, 90)
    means = patch_means(images, 16)
    assert means.shape == (2, 5, 6, 1)  # ceil(70 / 16), ceil(90 / 16), as the stem and merging pad
    for i, j in ((0, 0), (4, 5), (2, 3)):  # (4, 5) overhangs the image: its real pixels only
        patch = images[:, :, 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
        torch.testing.assert_close(means[:, i, j, 0], patch.mean((1, 2, 3)))
    model = timm.create_model('eapt_nano')
    sizes = [tuple(f.shape[-2:]) for f in model.forward_intermediates(images, intermediates_only=True)]
    assert [tuple(a[0].shape[1:3]) for a in model._stage_inputs(images)] == sizes


def test_patch_amplitudes_follow_the_image_and_survive_gradient_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model('eapt_nano', num_classes=4)
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    brighter = model(images + 0.5)  # a brighter image: other amplitudes, other encodings
    assert not torch.allclose(logits, brighter)
    model.set_grad_checkpointing(True)
    model.train()
    checkpointed = model(images)
    model.set_grad_checkpointing(False)
    model.eval()
    torch.testing.assert_close(checkpointed, model(images))
    checkpointed.sum().backward()


def test_an_unknown_amplitude_is_refused():
    with pytest.raises(ValueError, match="mcmd_amplitude 'mean' is not one of"):
        timm.create_model('eapt_nano', mcmd_amplitude='mean')
