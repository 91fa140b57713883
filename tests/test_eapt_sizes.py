"""EAPT's sizes against the paper's framework tables: EAPT-M and EAPT-L in Table V (HTC+++ against
Swin's HTC++) imply backbone sizes that the default MLP ratios reproduce (docs/eapt.md, "MLP ratio")."""
import pytest
import timm

import deformvit

# (EAPT variant, its HTC+++ sizes in Table V, the Swin backbone of the same widths, Swin's HTC++ size)
TABLE_V = [
    ('eapt_medium', (182e6,), 'swin_base_patch4_window7_224', 160e6),
    ('eapt_large', (319e6, 309e6), 'swin_large_patch4_window7_224', 284e6),
]


@pytest.mark.parametrize('eapt, sizes, swin, swin_htc', TABLE_V, ids=[row[0] for row in TABLE_V])
def test_table_v_framework_sizes_imply_our_backbones(eapt, sizes, swin, swin_htc):
    framework = swin_htc - deformvit.count_parameters(timm.create_model(swin, num_classes=0))
    implied = [size - framework for size in sizes]  # HTC+++ without its backbone, as for Swin
    ours = deformvit.count_parameters(timm.create_model(eapt, num_classes=0))
    assert min(implied) * 0.97 <= ours <= max(implied) * 1.03, (ours / 1e6, [i / 1e6 for i in implied])


def test_one_mlp_ratio_per_model_is_an_argument():
    model = timm.create_model('eapt_nano', mlp_ratio=3)
    assert {block.mlp.fc1.out_features / block.mlp.fc1.in_features
            for stage in model.stages for block in stage.blocks} == {3}
