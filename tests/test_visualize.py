"""``deformvit visualize``: DAT Figs. 5-7 and EAPT Figs. 5-6 computed and drawn on small models.

Every figure's data is checked against an independent computation: recorded attention against
the softmax of DAT Eq. (9) written out, key importance (Fig. 5) against dense token-to-token
matrices multiplied out, edge differences (EAPT Fig. 6) against hand computations on
constructed maps.
"""
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import deformvit.models.dat as dat_module
from deformvit import save_safetensors
from deformvit.checkpoint import metadata_for
from deformvit.cli import main
from deformvit.data.images import to_rgb
from deformvit.tasks import load_model
from deformvit.tools import visualize as vis


def dat_nano(**kwargs):
    return timm.create_model('dat_nano', **kwargs).eval()


def cli(*argv):
    main(['visualize', *argv])


def figure_pixels(panels: int, extra_inches: float = 0.) -> tuple:
    return (round((vis.PANEL_INCHES * panels + extra_inches) * vis.DPI),
            round((vis.PANEL_INCHES + vis.TITLE_INCHES) * vis.DPI))


# ---------------------------------------------------------------- recorded attention (DAT Eq. (9))

def _capture_deformable_attention_inputs(model, x, monkeypatch):
    """(q, k, bias) that every deformable block hands to the shared attention function."""
    active, captured = [], []
    original = dat_module.attention

    def spy(q, k, v, bias=None, dropout_p=0., fused=True):
        if active:
            captured.append((q, k, bias))
        return original(q, k, v, bias, dropout_p, fused)

    monkeypatch.setattr(dat_module, 'attention', spy)
    def enter(module, args):
        active.append(module)

    def leave(module, args, out):
        active.pop()

    handles = []
    for _, _, attn in model.deformable_blocks():
        handles += [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    monkeypatch.undo()
    return captured


def test_recorded_attention_is_the_softmax_of_dat_eq9_and_fig7_picks_its_top_keys(monkeypatch):
    model = dat_nano()
    with torch.no_grad():  # sharper attention, so that the top keys are well separated
        for _, _, attn in model.deformable_blocks():
            attn.proj_q.weight.mul_(8)
    x = torch.randn(2, 3, 64, 64)
    captured = _capture_deformable_attention_inputs(model, x, monkeypatch)
    _, records = vis.record_deformable_attention(model, x)
    assert len(captured) == len(records) == 2
    oracles = []
    for (q, k, bias), record in zip(captured, records):
        logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias  # DAT Eq. (9)
        oracles.append(logits.softmax(-1))
        torch.testing.assert_close(record.attention, oracles[-1], rtol=1e-4, atol=1e-6)

    oracle = oracles[-1]  # (B, heads, HW, Ns) of the last deformable layer: a 2x2 map of stride 32
    result = vis.query_keys(records[-1], query=(40., 10.), image_size=(64, 64))
    assert result.token == (1, 0)
    query = 1 * 2 + 0
    assert torch.equal(result.weights.topk(3).indices, oracle[:, :, query].mean(1).topk(3).indices)
    for head in range(oracle.shape[1]):
        per_head = vis.query_keys(records[-1], (40., 10.), (64, 64), head=head)
        assert torch.equal(per_head.weights.argmax(-1), oracle[:, head, query].argmax(-1))
    expected_points = records[-1].sampling.to_pixels('points').flatten(2, 3)  # (B, G, Ns, 2)
    torch.testing.assert_close(result.points, expected_points)


def test_recording_is_switched_off_afterwards_and_leaves_default_outputs_unchanged():
    model = dat_nano()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    recorded_logits, records = vis.record_deformable_attention(model, x)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    torch.testing.assert_close(recorded_logits, before, rtol=1e-4, atol=1e-5)  # explicit vs fused path
    for _, _, attn in model.deformable_blocks():
        assert not attn.record_attention and attn.last_attention is None
        assert not attn.record_sampling and attn.last_sampling is None
    assert all(torch.allclose(r.attention.sum(-1), torch.ones(())) for r in records)


def test_datpp_records_its_deformable_attention_and_draws_the_dat_figures(tmp_path):
    """DAT++'s deformable blocks record points and attention as DAT's do: the same figures apply."""
    torch.manual_seed(0)
    model = timm.create_model('datpp_tiny', embed_dims=(16, 32, 64, 128), stage_spec=('ND', 'ND', 'DN', 'D'),
                              num_heads=(1, 2, 4, 8), groups=(1, 1, 2, 4), num_classes=10).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain = model(x)
    logits, records = vis.record_deformable_attention(model, x)
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-5)
    assert len(records) == len(model.deformable_blocks()) == 4
    for record in records:
        assert torch.allclose(record.attention.sum(-1), torch.ones(()))
        points = record.sampling.points
        assert points.abs().max() <= 1  # the release clamps its points to the map
    figure = vis.draw_sampling_points(np.zeros((64, 96, 3)), [r.sampling for r in records])
    assert len([ax for ax in figure.axes if ax.has_data()]) == 4


# ---------------------------------------------------------------- DAT Fig. 6

def test_drawn_sampling_points_lie_where_forward_sampling_points_says():
    model = dat_nano()
    x = torch.randn(2, 3, 64, 64)
    _, records = vis.record_deformable_attention(model, x)
    _, reference_records = model.forward_sampling_points(x)  # an independent forward
    display = np.zeros((64, 64, 3))
    fig = vis.draw_sampling_points(display, [records[-1].sampling], group=3, batch=1)
    ax = fig.axes[0]
    assert list(ax.images[0].get_extent()) == [-0.5, 63.5, 63.5, -0.5]  # pixel (i, j) centred on (x=j, y=i)
    drawn = {c.get_label(): torch.as_tensor(np.asarray(c.get_offsets()), dtype=torch.float32) for c in ax.collections
             if c.get_label() in ('deformed points', 'reference points')}
    expected = reference_records[-1]
    torch.testing.assert_close(drawn['deformed points'], expected.to_pixels('points')[1, 3].reshape(-1, 2).flip(-1))
    torch.testing.assert_close(drawn['reference points'], expected.to_pixels('reference')[1, 3].reshape(-1, 2).flip(-1))
    with pytest.raises(ValueError, match='group 4 is out of range'):
        vis.draw_sampling_points(display, [records[-1].sampling], group=4)


# ---------------------------------------------------------------- DAT Fig. 5

def _dense_keys_to_tokens(record: vis.AttentionRecord) -> torch.Tensor:
    """(B, Ns, HW): bilinear weights read off grid_sample of one-hot maps, renormalised per point,
    averaged over the offset groups."""
    sampling = record.sampling
    b, g, hk, wk, _ = sampling.points.shape
    h, w = sampling.feature_size
    one_hot = torch.eye(h * w).view(h * w, 1, h, w)
    matrices = torch.zeros(b, hk * wk, h * w)
    for i in range(b):
        for group in range(g):
            grid = sampling.points[i, group].reshape(1, 1, hk * wk, 2).flip(-1).expand(h * w, -1, -1, -1)
            taps = F.grid_sample(one_hot, grid, align_corners=sampling.align_corners).view(h * w, hk * wk).T
            total = taps.sum(1, keepdim=True)
            matrices[i] += torch.where(total > 0, taps / total.clamp_min(1e-12), torch.zeros_like(taps)) / g
    return matrices


def _dense_downsampling(size, earlier, factor) -> torch.Tensor:
    """(HW, H'W'): each token shared equally by the tokens of the earlier stage under it."""
    (h, w), (he, we) = size, earlier
    matrix = torch.zeros(h * w, he * we)
    for i in range(h):
        for j in range(w):
            children = [(a, c) for a in range(i * factor, (i + 1) * factor) for c in range(j * factor, (j + 1) * factor)
                        if a < he and c < we]
            for a, c in children:
                matrix[i * w + j, a * we + c] = 1 / len(children)
    return matrix


def _dense_key_importance(records, layer, head):
    last = records[-1].attention
    scores = (last.mean(1) if head is None else last[:, head]).mean(1)  # (B, Ns): mean over all queries
    for i in range(len(records) - 1, layer, -1):
        upper, lower = records[i].sampling, records[i - 1].sampling
        tokens = torch.bmm(scores[:, None], _dense_keys_to_tokens(records[i]))[:, 0]
        tokens = tokens @ _dense_downsampling(upper.feature_size, lower.feature_size, upper.stride // lower.stride)
        scores = torch.bmm(tokens[:, None], records[i - 1].attention.mean(1))[:, 0]
    return scores


@pytest.mark.parametrize('offset_range_factor', [2., None])
def test_key_importance_equals_dense_token_to_token_matrices_multiplied_out(offset_range_factor):
    # deformable blocks in three stages, two of them in one stage, a stride-2 reference grid, odd map sizes
    model = dat_nano(stage_spec=('LS', 'LD', 'DLD', 'D'), offset_stride=(4, 2, 1, 1))
    if offset_range_factor is None:  # unbounded offsets: some points leave their map altogether
        for _, _, attn in model.deformable_blocks():
            attn.offset_range_factor = None  # (timm.create_model drops None arguments)
    _, records = vis.record_deformable_attention(model, torch.randn(2, 3, 72, 72))
    assert [(r.sampling.stage, r.sampling.feature_size) for r in records] == [(1, (9, 9)), (2, (5, 5)), (2, (5, 5)), (3, (3, 3))]
    for layer, head in ((0, None), (0, 5), (2, None), (3, 2)):
        importance = vis.key_importance(records, layer=layer, head=head)
        expected = _dense_key_importance(records, layer, head)
        torch.testing.assert_close(importance.scores, expected, rtol=1e-4, atol=1e-7)
        assert (importance.scores >= 0).all()
        assert (importance.stage, importance.block) == (records[layer].sampling.stage, records[layer].sampling.block)
    totals = vis.key_importance(records).scores.sum(-1)
    if offset_range_factor is None:
        assert (totals < 0.999).all()  # the mass of keys read entirely from padding is dropped
    else:
        torch.testing.assert_close(totals, torch.ones(2))  # every point touches its map


def test_key_importance_rejects_bad_layer_and_head():
    _, records = vis.record_deformable_attention(dat_nano(), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='head 8 is out of range: the last deformable block has 8 heads'):
        vis.key_importance(records, head=8)
    with pytest.raises(ValueError, match='layer 2 is out of range for 2 deformable blocks'):
        vis.key_importance(records, layer=2)
    with pytest.raises(ValueError, match='outside the 64x64 input'):
        vis.query_keys(records[-1], (64., 3.), (64, 64))


# ---------------------------------------------------------------- EAPT Figs. 5-6

def test_edge_difference_of_window_constant_map_is_the_jump_between_window_constants():
    rows, cols, window = 3, 4, (4, 4)
    constants = torch.randn(2, 3, rows, cols)
    features = constants.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :10, :14]  # partial last windows
    result = vis.edge_differences(features, window)
    horizontal = (constants[..., :, :-1] - constants[..., :, 1:]).abs().mean(1)
    vertical = (constants[..., :-1, :] - constants[..., 1:, :]).abs().mean(1)
    torch.testing.assert_close(result.horizontal, horizontal)
    torch.testing.assert_close(result.vertical, vertical)
    for r in range(rows):
        for c in range(cols):
            edges = ([horizontal[:, r, c - 1]] if c > 0 else []) + ([horizontal[:, r, c]] if c < cols - 1 else []) \
                + ([vertical[:, r - 1, c]] if r > 0 else []) + ([vertical[:, r, c]] if r < rows - 1 else [])
            assert len(edges) == (2 if r in (0, rows - 1) and c in (0, cols - 1) else
                                  3 if r in (0, rows - 1) or c in (0, cols - 1) else 4)
            torch.testing.assert_close(result.per_window[:, r, c], torch.stack(edges).mean(0))


def test_edge_difference_of_a_smooth_ramp_is_one_step_of_the_ramp():
    slope_x, slope_y = 0.3, -0.2
    y, x = torch.meshgrid(torch.arange(21.), torch.arange(21.), indexing='ij')
    ramp = (slope_x * x + slope_y * y)[None, None]
    blocks = (slope_x * 7 * (x // 7) + slope_y * 7 * (y // 7))[None, None]  # the same slope, constant per window
    smooth, blocky = vis.edge_differences(ramp, (7, 7)), vis.edge_differences(blocks, (7, 7))
    torch.testing.assert_close(smooth.horizontal, torch.full((1, 3, 2), 0.3))
    torch.testing.assert_close(smooth.vertical, torch.full((1, 2, 3), 0.2))
    torch.testing.assert_close(smooth.per_window[0, 1, 1], torch.tensor((2 * 0.3 + 2 * 0.2) / 4))  # four edges
    torch.testing.assert_close(smooth.per_window[0, 0, 1], torch.tensor((2 * 0.3 + 0.2) / 3))  # three
    torch.testing.assert_close(smooth.per_window[0, 2, 2], torch.tensor((0.3 + 0.2) / 2))  # a corner: two
    torch.testing.assert_close(blocky.per_window, smooth.per_window * 7)
    # x * y: across a vertical boundary the two edge columns differ by y, averaged over the edge's samples
    product = vis.edge_differences((x * y)[None, None], (7, 7))
    torch.testing.assert_close(product.horizontal[0, :, 0], torch.tensor([3., 10., 17.]))
    with pytest.raises(ValueError, match='single window'):
        vis.edge_differences(ramp[..., :7, :7], (7, 7))


def test_stage_windows_and_heatmaps_of_eapt_and_dat_follow_their_stages():
    x = torch.randn(1, 3, 64, 64)
    for model in (timm.create_model('eapt_nano').eval(), dat_nano()):
        with torch.no_grad():
            features = model.forward_intermediates(x, intermediates_only=True)
        sizes = [tuple(f.shape[-2:]) for f in features]
        assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2)]
        assert vis.stage_windows(model, sizes) == [(4, 4), (4, 4), (4, 4), (2, 2)]
        heatmaps = vis.feature_heatmaps(features, 'norm')
        torch.testing.assert_close(heatmaps[1], features[1].norm(dim=1))
        torch.testing.assert_close(vis.feature_heatmaps(features, 'mean')[0], features[0].mean(dim=1))


def test_heatmap_upsampling_centres_each_token_on_its_pixels():
    tokens = torch.zeros(1, 4, 4)
    tokens[0, 1, 2] = 1.
    up = vis.upsample_to_image(tokens, 8, (30, 32))[0]  # bottom rows are padding, cropped
    assert up.shape == (30, 32)
    rows, cols = torch.meshgrid(torch.arange(30.), torch.arange(32.), indexing='ij')
    centre = ((up * rows).sum() / up.sum(), (up * cols).sum() / up.sum())
    torch.testing.assert_close(torch.stack(centre), torch.tensor([1.5 * 8 - 0.5, 2.5 * 8 - 0.5]))  # to_pixels' centre


def test_eapt_sampling_points_are_the_recorded_key_positions_in_pixels():
    model = timm.create_model('eapt_nano').eval()
    x = torch.randn(1, 3, 64, 64)
    attn = model.stages[1].blocks[1].attn
    attn.record_sampling = True
    with torch.no_grad():
        model(x)
    raw = attn.last_sampling[0][0]  # (nW, N, 2) positions of a 8x8 map in 2x2 windows of 4x4
    attn.record_sampling, attn.last_sampling = False, None
    _, records = model.forward_sampling_points(x)
    record = next(r for r in records if (r.stage, r.block) == (1, 1))
    points, reference = record.to_pixels('points')[0, 0], record.to_pixels('reference')[0, 0]  # (8, 8, 2)
    for i in range(8):
        for j in range(8):
            position = raw[(i // 4) * 2 + j // 4, (i % 4) * 4 + j % 4]
            torch.testing.assert_close(points[i, j], (position + 0.5) * 8 - 0.5)
            torch.testing.assert_close(reference[i, j], torch.tensor([(i + 0.5) * 8 - 0.5, (j + 0.5) * 8 - 0.5]))
    assert all(not a.record_sampling and a.last_sampling is None for *_, a in model.attention_modules())


# ---------------------------------------------------------------- images, weights, command line

def test_grayscale_rgba_and_16_bit_images_become_rgb(tmp_path):
    gray = tmp_path / 'gray.png'
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(gray)
    image = np.asarray(vis.load_image(str(gray)))
    assert image.shape == (8, 8, 3) and (image[..., 0] == image[..., 2]).all() and image[0, 1, 0] == 1

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, 4:] = (0, 0, 255, 255)  # right half opaque blue, left half transparent
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    image = np.asarray(vis.load_image(str(tmp_path / 'rgba.png')))
    assert (image[:, :4] == 255).all() and (image[:, 4:] == (0, 0, 255)).all()

    deep = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / 'deep.png')
    image = np.asarray(vis.load_image(str(tmp_path / 'deep.png')))
    assert image[..., 0].tolist() == [[0, 64], [128, 255]]


def test_display_is_the_preprocessed_crop(tmp_path):
    model = dat_nano()  # crop_pct 1.0: a 64x96 image at --size 64 is resized to 64x96 and center-cropped to 64x64
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[:, 48:] = (0, 0, 255, 255)
    image = to_rgb(Image.fromarray(rgba, 'RGBA'))
    x, display = vis.preprocess(image, model, size=64)
    assert x.shape == (1, 3, 64, 64) and display.shape == (64, 64, 3)
    # the crop starts at image column 16: image columns 0-47 (white) are display columns 0-31
    np.testing.assert_allclose(display[:, :32], 1., atol=1e-5)
    np.testing.assert_allclose(display[:, 32:], np.broadcast_to([0., 0., 1.], (64, 32, 3)), atol=1e-5)
    with pytest.raises(ValueError, match='smaller than the 32x32 minimum'):
        vis.preprocess(image, model, size=16)


def test_weights_come_from_a_seed_a_training_checkpoint_or_a_converted_file(tmp_path):
    torch.manual_seed(3)
    model = load_model('dat_nano').model
    torch.manual_seed(3)
    again = load_model('dat_nano')
    assert again.architecture == 'dat_nano' and again.weights == 'random weights, untrained'
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.model.state_dict().values()))

    trained = timm.create_model('dat_nano', num_classes=10)
    training = tmp_path / 'best.safetensors'
    save_safetensors(trained.state_dict(), str(training),
                     metadata_for('dat_nano', {'num_classes': 10}, [str(i) for i in range(10)], 3))
    loaded = load_model(checkpoint=str(training), default='eapt_small')
    assert loaded.architecture == 'dat_nano' and loaded.weights == 'weights best.safetensors'
    assert loaded.model.num_classes == 10 and loaded.classes == [str(i) for i in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match='holds a dat_nano model, not eapt_nano'):
        load_model('eapt_nano', str(training))

    converted = tmp_path / 'converted.safetensors'
    save_safetensors(model.state_dict(), str(converted))
    loaded = load_model('dat_nano', str(converted))
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


def test_cli_writes_every_dat_figure_as_decodable_png_of_the_expected_size(tmp_path, capsys):
    out = tmp_path / 'figures'
    cli('--model', 'dat_nano', '--size', '64', '--output', str(out), '--sample', 'astronaut', '--top-k', '5')
    printed = capsys.readouterr().out.split()
    names = ['sampling-points', 'key-importance', 'query-keys', 'eapt-heatmaps', 'eapt-edges']
    assert printed == [str(out / f'dat_nano-{name}.png') for name in names]
    expected = {
        'sampling-points': figure_pixels(2),  # the deformable blocks of stages 2 and 3
        'key-importance': figure_pixels(1),
        'query-keys': figure_pixels(1),
        'eapt-heatmaps': figure_pixels(5),  # the input and four stages
        'eapt-edges': figure_pixels(2, 1.2),  # stages 0 and 1: stages 2-3 are a single window
    }
    for name, size in expected.items():
        with Image.open(out / f'dat_nano-{name}.png') as image:
            image.load()
            assert image.format == 'PNG' and image.size == size


def test_cli_draws_eapt_figures_from_grayscale_input_with_options(tmp_path, capsys):
    gray = tmp_path / 'gray.png'
    Image.fromarray((np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8)).save(gray)
    cli('--model', 'eapt_nano', '--image', str(gray), '--size', '64', '--output', str(tmp_path),
        '--figure', 'sampling-points', 'eapt-heatmaps', 'eapt-edges', '--stage', '1', '--reduction', 'mean')
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == [
        'eapt_nano-sampling-points.png', 'eapt_nano-eapt-heatmaps.png', 'eapt_nano-eapt-edges.png']
    sizes = [Image.open(p).size for p in printed]
    assert sizes == [figure_pixels(1), figure_pixels(2), figure_pixels(1, 0.6)]


@pytest.mark.parametrize('argv, message', [
    (['--image', 'no/such/file.png'], 'no image file at no/such/file.png'),
    (['--image', '{text}'], 'is not a readable image'),
    (['--model', 'eapt_nano', '--figure', 'key-importance'], 'key-importance is a DAT figure and does not apply'),
    (['--model', 'resnet99'], "unknown model 'resnet99'"),
    (['--checkpoint', 'missing.safetensors'], 'no checkpoint file at missing.safetensors'),
    (['--figure', 'query-keys', '--block', '1'], '--block needs --stage'),
    (['--figure', 'sampling-points', '--stage', '0'], 'stages.0 has no deformable block; deformable blocks: '
                                                      'stages.2.blocks.1, stages.3.blocks.1'),
    (['--figure', 'query-keys', '--query', '10', '64'], r'query point \(y=64.0, x=10.0\) lies outside the 64x64 input'),
    (['--figure', 'query-keys', '--head', '8'], 'head 8 is out of range'),
    (['--size', '16'], 'input size 16 is smaller than the 32x32 minimum'),
    (['--figure', 'eapt-edges', '--stage', '3'], 'stage 3 \\(2x2\\) is a single window'),
])
def test_cli_bad_inputs_give_clear_errors(tmp_path, argv, message):
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    argv = [a.replace('{text}', str(text)) for a in argv]
    if '--model' not in argv:
        argv += ['--model', 'dat_nano']
    if '--size' not in argv:
        argv += ['--size', '64']
    with pytest.raises(SystemExit, match=f'^deformvit visualize: .*{message}'):
        cli(*argv, '--output', str(tmp_path / 'out'))
