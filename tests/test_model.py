"""Augmentation invariants, per-step sampling, the prior, the glyph decoder and its glimpses,
determinism, generation functions."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cdsvae


def video(batch=4, frames=5, size=16, seed=0):
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_config(**overrides):
    values = dict(frame_shape=(3, 16, 16), static_dim=6, dynamic_dim=3, feature_dim=8,
                  hidden_dim=10, conv_width=4, dataset_size=100)
    return cdsvae.Config(**{**values, **overrides})


# --- content augmentation ---------------------------------------------------------------------

def test_content_order_is_a_permutation_per_sequence_with_shuffles_and_reversals():
    order = cdsvae.content_order(400, 7, generator=torch.Generator().manual_seed(0))
    assert order.shape == (400, 7)
    assert torch.equal(order.sort(dim=1).values, torch.arange(7).expand(400, 7))
    reversed_rows = (order == torch.arange(6, -1, -1)).all(dim=1)
    assert 100 < int(reversed_rows.sum()) < 300      # about half reversed, the rest shuffled


def test_permuted_frame_features_are_the_encoding_of_the_content_view():
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(small_config()).eval()
    x = video()
    order = cdsvae.content_order(4, 5, generator=torch.Generator().manual_seed(1))
    features = model.encode_frames(x)
    gathered = torch.gather(features, 1, order.unsqueeze(-1).expand_as(features))
    content_view = torch.stack([x[b, order[b]] for b in range(4)])
    assert torch.allclose(gathered, model.encode_frames(content_view), atol=1e-6)


# --- motion augmentation ----------------------------------------------------------------------

def test_motion_augmentation_applies_one_transform_to_every_frame():
    x = video(batch=6, frames=5)
    params = cdsvae.draw_motion_params(6, 3, generator=torch.Generator().manual_seed(3))
    whole = cdsvae.apply_motion_params(x, params)
    for t in range(5):   # each frame on its own, same parameters: the same result
        single = cdsvae.apply_motion_params(x[:, t:t + 1], params)
        assert torch.allclose(whole[:, t:t + 1], single, atol=1e-6)
    still = x[:, :1].expand(6, 5, 3, 16, 16)  # a still sequence stays still
    out = cdsvae.apply_motion_params(still, params)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)


def test_motion_augmentation_changes_appearance_and_stays_in_range():
    x = video(batch=8)
    augmented = cdsvae.motion_augment(x, generator=torch.Generator().manual_seed(0))
    assert augmented.shape == x.shape
    assert augmented.min() >= 0 and augmented.max() <= 1
    per_sequence_change = (augmented - x).abs().mean(dim=(1, 2, 3, 4))
    assert (per_sequence_change > 0.01).all()


def test_motion_parameters_differ_between_sequences():
    params = cdsvae.draw_motion_params(32, 3, generator=torch.Generator().manual_seed(0))
    assert params.brightness.unique().numel() == 32
    assert params.affine.shape == (32, 2, 3)
    x = video(batch=32)
    augmented = cdsvae.apply_motion_params(x, params)
    change = (augmented - x).abs().mean(dim=(1, 2, 3, 4))          # each sequence changed its own way
    assert change.unique().numel() == 32 and (change > 0.01).all()


def test_motion_augmentation_keeps_the_ground_truth_motion_of_shapes():
    """The motion view changes the look, not the motion: on the built-in shapes, the labelled
    direction (left/right) and the size's trend (growing/shrinking) read from the augmented frames."""
    from data_prep import shapes
    videos, labels = shapes.render(64, seed=5)
    x = cdsvae.to_frames(videos, "cpu")
    augmented = cdsvae.motion_augment(x, generator=torch.Generator().manual_seed(1))
    assert (augmented - x).abs().mean() > 0.02
    for frames, name in ((x, "original"), (augmented, "augmented")):
        background = frames[:, :, :, :2, :2].mean(dim=(3, 4), keepdim=True)     # corner colour
        mask = ((frames - background).abs().amax(dim=2) > 0.15).float()          # (B, T, H, W)
        columns = torch.arange(mask.shape[-1]).float()
        centre_x = (mask.sum(2) * columns).sum(-1) / mask.sum(dim=(2, 3)).clamp(min=1)
        area = mask.sum(dim=(2, 3))
        moving_right = (centre_x[:, -1] > centre_x[:, 0]).numpy()
        growing = (area[:, -1] > area[:, 0]).numpy()
        assert (moving_right == (labels["direction"] == 0)).mean() >= 0.95, name
        assert (growing == shapes.growing(labels)).mean() >= 0.95, name


def test_identity_motion_params_leave_the_video_unchanged():
    x = video(batch=2)
    identity = cdsvae.MotionParams(
        affine=torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).repeat(2, 1, 1),
        brightness=torch.ones(2), contrast=torch.ones(2), saturation=torch.ones(2),
        channels=torch.arange(3).repeat(2, 1), blur_sigma=torch.zeros(2))
    assert torch.allclose(cdsvae.apply_motion_params(x, identity), x, atol=1e-5)


def test_glyph_distortions_turn_scale_and_shear_within_their_ranges_and_zero_is_the_identity():
    """Ours (--glyph-distort): each map is scale * rotation(angle) @ [[1, shear], [0, 1]], its
    three numbers within 15 degrees, 10% and 0.15 times the strength; no shift."""
    import math
    maps = cdsvae.glyph_distortions(2000, 0.5, generator=torch.Generator().manual_seed(0)).double()
    scale = maps[:, :, :2].det().sqrt()
    angle = torch.atan2(maps[:, 1, 0], maps[:, 0, 0])
    shear = (maps[:, 0, 1] * torch.cos(angle) + maps[:, 1, 1] * torch.sin(angle)) / scale
    rebuilt = scale[:, None, None] * torch.stack([torch.stack([torch.cos(angle), -torch.sin(angle)], 1),
                                                  torch.stack([torch.sin(angle), torch.cos(angle)], 1)], 1) @ \
        torch.stack([torch.stack([torch.ones_like(shear), shear], 1),
                     torch.stack([torch.zeros_like(shear), torch.ones_like(shear)], 1)], 1)
    torch.testing.assert_close(rebuilt, maps[:, :, :2])
    assert (maps[:, :, 2] == 0).all()
    for values, bound in ((angle, math.pi / 24), (scale - 1, 0.05), (shear, 0.075)):
        assert values.abs().max() <= bound + 1e-6 and values.abs().max() > 0.9 * bound
    identity = cdsvae.glyph_distortions(3, 0.0)
    glimpses = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(cdsvae.distorted(glimpses, identity), glimpses, atol=1e-5, rtol=0)
    turned = cdsvae.distorted(glimpses, torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]).expand(3, 2, 3))
    torch.testing.assert_close(turned, glimpses.transpose(-1, -2).flip(-2), atol=1e-5, rtol=0)   # a quarter turn


# --- per-step sampling ------------------------------------------------------------------------

def rollout_with_lstm_cell(features, posterior: cdsvae.DynamicPosterior, eps):
    """An independent rollout through torch.nn.LSTMCell with the same weights."""
    hidden = posterior.head.in_features
    latent = posterior.head.out_features // 2
    cell = nn.LSTMCell(features.shape[-1] + latent, hidden).double()
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([posterior.input_proj.weight, posterior.recurrent.weight[:, :latent]], 1))
        cell.weight_hh.copy_(posterior.recurrent.weight[:, latent:])
        cell.bias_ih.copy_(posterior.input_proj.bias)
        cell.bias_hh.zero_()
    z = features.new_zeros(features.shape[0], latent)
    state, samples = None, []
    for t in range(features.shape[1]):
        state = cell(torch.cat([features[:, t], z], 1), state)
        mean, logvar = posterior.head(state[0]).chunk(2, 1)
        z = mean + torch.exp(0.5 * logvar) * eps[:, t]
        samples.append(z)
    return torch.stack(samples, 1)


@pytest.mark.parametrize("frames", [1, 8, 15])
def test_dynamic_posterior_matches_an_lstm_cell_rollout(frames):
    torch.manual_seed(0)
    posterior = cdsvae.DynamicPosterior(small_config(feature_dim=7, hidden_dim=9, dynamic_dim=5)).double()
    features = torch.randn(3, frames, 7, dtype=torch.float64)
    eps = torch.randn(3, frames, 5, dtype=torch.float64)
    z, mean, logvar = posterior(features, eps)
    assert z.shape == mean.shape == logvar.shape == (3, frames, 5)
    assert torch.allclose(z, rollout_with_lstm_cell(features, posterior, eps), atol=1e-10)
    assert torch.allclose(z, mean + torch.exp(0.5 * logvar) * eps, atol=1e-12)


def test_each_step_is_sampled_from_the_previous_sample():
    torch.manual_seed(0)
    posterior = cdsvae.DynamicPosterior(small_config()).double()
    features = torch.randn(2, 6, 8, dtype=torch.float64)
    eps = torch.randn(2, 6, 3, dtype=torch.float64)
    z, mean, _ = posterior(features, eps)
    changed = eps.clone()
    changed[:, 3] += 1.0
    z2, mean2, _ = posterior(features, changed)
    assert torch.equal(z[:, :3], z2[:, :3]) and torch.equal(mean[:, :4], mean2[:, :4])
    assert not torch.allclose(mean[:, 4:], mean2[:, 4:])   # later steps see the new z_3


def test_rollout_gradients_match_finite_differences():
    torch.manual_seed(0)
    B, T, H, Dz = 2, 3, 4, 2
    inputs = (torch.randn(B, T, 4 * H, dtype=torch.float64, requires_grad=True),
              (0.5 * torch.randn(4 * H, Dz + H, dtype=torch.float64)).requires_grad_(),
              (0.5 * torch.randn(2 * Dz, H, dtype=torch.float64)).requires_grad_(),
              torch.randn(2 * Dz, dtype=torch.float64, requires_grad=True),
              torch.randn(B, T, Dz, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: cdsvae.lstm_sample_rollout(*a), inputs)


def test_training_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(small_config())
    loss, _ = model(video())
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_order_free_static_posterior_is_a_mean_over_frames_and_ignores_their_order():
    """--static-pool mean (ours): q(s|x)'s Gaussian is head(layer(mean_t layer(f_t))), computed
    here by hand, and the same for every order of the frames; the model trains every parameter."""
    torch.manual_seed(0)
    cfg = small_config(static_pool="mean")
    posterior = cdsvae.StaticPosterior(cfg).double()
    features = torch.randn(3, 7, cfg.feature_dim, dtype=torch.float64)
    leaky = lambda v: torch.where(v > 0, v, 0.2 * v)   # noqa: E731
    frame, pooled = posterior.frame[0], posterior.pooled[0]
    per_frame = [leaky(features[:, t] @ frame.weight.T + frame.bias) for t in range(7)]
    summary = leaky(sum(per_frame) / 7 @ pooled.weight.T + pooled.bias)
    direct = summary @ posterior.head.weight.T + posterior.head.bias
    mean, logvar = posterior(features)
    assert torch.allclose(torch.cat([mean, logvar], 1), direct, atol=1e-12)
    shuffled = posterior(features[:, torch.randperm(7)])
    assert torch.allclose(shuffled[0], mean, atol=1e-12) and torch.allclose(shuffled[1], logvar, atol=1e-12)
    model = cdsvae.CDSVAE(cfg)
    model(video())[0].backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert not hasattr(model.static_posterior, "lstm")


def test_attention_pool_is_a_softmax_weighted_mean_over_frames_that_starts_as_the_plain_mean():
    """--static-pool attention (ours): sum_t softmax_t(w . c_t + b) c_t, written out here; the same
    for every order of the frames; at the start (w, b zero) the plain mean; with glyphs the glimpse
    posterior pools each glyph's codes over time so, and the model trains the score."""
    torch.manual_seed(0)
    codes = torch.randn(3, 7, 2, 5, dtype=torch.float64)            # (B, T, K, W), glyph codes
    score = cdsvae.zero_score(5).double()
    torch.testing.assert_close(cdsvae.attention_pool(codes, score), codes.mean(1), atol=1e-12, rtol=0)
    with torch.no_grad():
        score.weight.normal_()
        score.bias.fill_(0.3)
    direct_pooled = torch.zeros(3, 2, 5, dtype=torch.float64)
    for b in range(3):
        for k in range(2):
            logits = [float(codes[b, t, k] @ score.weight[0]) + 0.3 for t in range(7)]
            weights = np.exp(logits) / np.exp(logits).sum()
            direct_pooled[b, k] = torch.from_numpy(sum(weights[t] * codes[b, t, k].numpy() for t in range(7)))
    torch.testing.assert_close(cdsvae.attention_pool(codes, score).detach(), direct_pooled, atol=1e-12, rtol=0)
    shuffled = cdsvae.attention_pool(codes[:, torch.randperm(7)], score)
    torch.testing.assert_close(shuffled, cdsvae.attention_pool(codes, score), atol=1e-12, rtol=0)
    posterior = cdsvae.GlimpseStaticPosterior(glyph_config(static_pool="attention"), width=5).double()
    posterior.score = score
    mean, logvar = posterior(codes)
    direct = posterior.head(direct_pooled).view(3, 2, -1)
    torch.testing.assert_close(torch.cat([mean.view(3, 2, -1), logvar.view(3, 2, -1)], -1), direct)
    for cfg in (glyph_config(static_pool="attention"), small_config(static_pool="attention")):
        cdsvae.check_config(cfg)
        model = cdsvae.CDSVAE(cfg)
        x = torch.rand(4, 5, *cfg.frame_shape)
        model(x)[0].backward()
        assert model.static_posterior.score.weight.grad.abs().sum() > 0


# --- prior and generation ---------------------------------------------------------------------

def test_prior_teacher_forcing_agrees_with_step_by_step_generation():
    torch.manual_seed(0)
    prior = cdsvae.DynamicPrior(small_config())
    eps = torch.randn(3, 6, 3)
    trajectory = prior.sample(3, 6, eps)
    mean, logvar = prior(trajectory)   # p(z_t | z_<t) given the generated trajectory
    assert torch.allclose(trajectory, mean + torch.exp(0.5 * logvar) * eps, atol=1e-5)


def test_with_a_fitted_first_step_z1_comes_from_the_mixture_and_the_prior_goes_on_from_it():
    """After ``cdsvae fit-prior`` (ours) ``sample_dynamic`` draws z_1 from the fitted mixture (here
    two narrow components at +3 and -3) and z_2:T from p(z_t | z_<t) fed that z_1: checked against
    the prior teacher-forced on the drawn trajectory, with the noise the same generator gave first."""
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(small_config()).eval()
    dz = model.cfg.dynamic_dim
    model.fitted_first_step = cdsvae.Mixture(means=torch.tensor([[3.0] * dz, [-3.0] * dz]),
                                             logvars=torch.full((2, dz), -20.0), logits=torch.zeros(2))
    trajectory = cdsvae.sample_dynamic(model, 400, 5, torch.Generator().manual_seed(1))
    eps = torch.randn(400, 5, dz, generator=torch.Generator().manual_seed(1))
    first = trajectory[:, 0]
    assert torch.allclose(first.abs(), torch.full_like(first, 3.0), atol=1e-3)
    assert float((first[:, 0] > 0).float().mean()) == pytest.approx(0.5, abs=0.1)
    with torch.no_grad():
        mean, logvar = model.dynamic_prior(trajectory)
    assert torch.allclose(trajectory[:, 1:], (mean + torch.exp(0.5 * logvar) * eps)[:, 1:], atol=1e-5)
    assert "fitted" in cdsvae.dynamic_prior_name(model)
    model.fitted_first_step = None
    assert cdsvae.dynamic_prior_name(model) == "p(z_t | z_<t) (eq. 1)"
    with torch.no_grad():
        assert torch.equal(cdsvae.sample_dynamic(model, 400, 5, torch.Generator().manual_seed(1)),
                           model.dynamic_prior.sample(400, 5, eps))


def test_generation_functions_shapes_and_fixed_factors():
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(small_config()).eval()
    x = video()
    assert cdsvae.generate(model, batch=2, frames=7).shape == (2, 7, 3, 16, 16)
    encoding = model.encode(x)
    fixed_dynamic = cdsvae.generate(model, dynamic=encoding.dynamic_mean)
    assert fixed_dynamic.shape == x.shape
    fixed_static = cdsvae.generate(model, static=encoding.static_mean, frames=3)
    assert fixed_static.shape == (4, 3, 3, 16, 16)
    a_b, b_a = cdsvae.swap(model, x[:2], x[2:])
    assert torch.allclose(a_b, model.decode(encoding.static_mean[:2], encoding.dynamic_mean[2:]), atol=1e-6)
    assert torch.allclose(b_a, model.decode(encoding.static_mean[2:], encoding.dynamic_mean[:2]), atol=1e-6)


def test_feature_frames_use_the_mlp_path():
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(small_config(frame_shape=(12,)))
    x = torch.randn(4, 20, 12)
    loss, terms = model(x)
    loss.backward()
    # Without a precomputed motion view, I(z;x) falls back to the MWS estimate.
    views_loss, views_terms = model(x, motion_view=x + 0.01 * torch.randn_like(x))
    assert terms["mi_zx"] > views_terms["mi_zx"]
    assert cdsvae.generate(model, batch=2, frames=5).shape == (2, 5, 12)


# --- glyphs (ours): s draws K glyphs that z_t places; q(s|x, z) reads them there --------------

def glyph_config(**overrides):
    return small_config(**{"frame_shape": (1, 32, 32), "glyphs": 2, "likelihood": "bernoulli", **overrides})


def test_the_glimpse_at_a_glyphs_centre_is_the_glyph_it_placed_there():
    """Cutting a glyph-sized window at glyph k's centre undoes ``moved``, exactly where the centre
    is a whole number of pixels (here 2 to the right and 2 down of the frame's middle)."""
    torch.manual_seed(0)
    decoder = cdsvae.GlyphDecoder(glyph_config())
    nn.init.zeros_(decoder.where.weight)
    nn.init.constant_(decoder.where.bias, math.atanh(0.25))          # centre 0.125 of the half-width: 2 pixels
    dynamic = torch.randn(3, 3)
    glyphs = torch.rand(6, 1, 16, 16)
    glyphs[..., :2, :] = glyphs[..., :, :2] = 0                      # nothing leaves the window
    with torch.no_grad():
        placed = decoder.moved(glyphs, dynamic)                       # (3 * 2, 1, 32, 32)
        assert placed[:, :, 18:, 18:].sum() > 0 and placed[:, :, :10].sum() == 0  # drawn off the middle
        torch.testing.assert_close(placed[:, :, 10:26, 10:26], glyphs, atol=1e-5, rtol=0)  # top-left 16 + 2 - 8
        seen = decoder.glimpses(placed.view(3, 2, 1, 32, 32)[:, 0], decoder.centres(dynamic)).view(3, 2, 1, 16, 16)
    torch.testing.assert_close(seen[:, 0], glyphs.view(3, 2, 1, 16, 16)[:, 0], atol=1e-5, rtol=0)


def test_whole_pixels_draw_each_glyph_at_the_nearest_whole_pixel_and_leave_the_elbo():
    """``whole_pixels`` (ours): ``decode`` moves each glyph's centre to the nearest whole pixel (a
    glyph of 16 px then covers whole pixels of the 32 px frame), the gradient passing straight
    through; the ELBO (training, ``refine``) draws where z_t says, as without it."""
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(glyph_config(whole_pixels=True)).eval()
    plain = cdsvae.CDSVAE(glyph_config()).eval()
    plain.load_state_dict(model.state_dict())
    decoder = model.frame_decoder
    static = torch.randn(3, model.cfg.static_dim)
    dynamic = torch.randn(3, 4, model.cfg.dynamic_dim, requires_grad=True)
    with torch.no_grad():
        pixels = (decoder.centres(dynamic.flatten(0, 1)) + 1) * 16                 # (3 4 2, 2) in pixels
        assert (pixels - pixels.round()).abs().max() > 0.1                          # not on the grid by chance
        glyphs = decoder.drawn(static).view(3, 1, 2, 1, 16, 16).expand(3, 4, 2, 1, 16, 16).flatten(0, 2)
        expected = torch.sigmoid(decoder.union(decoder.placed(glyphs, pixels.round() / 16 - 1))).view(3, 4, 1, 32, 32)
        torch.testing.assert_close(model.decode(static, dynamic), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.decode(static, dynamic), expected, atol=1e-3)
        x = torch.rand(3, 4, 1, 32, 32)
        encoding = model.encode(x)
        assert model.elbo_terms(x, encoding)["recon"] == plain.elbo_terms(x, encoding)["recon"]
    snapped = decoder.on_pixels(decoder.centres(dynamic.flatten(0, 1)))
    gradient, = torch.autograd.grad(snapped.sum(), dynamic)                         # straight through
    unmoved, = torch.autograd.grad(decoder.centres(dynamic.flatten(0, 1)).sum(), dynamic)
    torch.testing.assert_close(gradient, unmoved)
    with pytest.raises(cdsvae.UserError, match="--whole-pixels places glyphs; expected --glyphs K"):
        cdsvae.check_config(small_config(whole_pixels=True))


def test_the_sampling_grid_is_affine_grids_and_so_are_its_gradients():
    """``scaled_and_shifted`` builds the grid by broadcasting; ``F.affine_grid`` with the matrix
    [[scale, 0, shift_x], [0, scale, shift_y]] is the reference, for a non-square output too."""
    torch.manual_seed(0)
    images = torch.rand(5, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    shift = (0.6 * torch.rand(5, 2, dtype=torch.float64) - 0.3).requires_grad_(True)
    theta = torch.cat([0.7 * torch.eye(2, dtype=torch.float64).expand(5, 2, 2), shift[:, :, None]], 2)
    expected = F.grid_sample(images, F.affine_grid(theta, (5, 2, 24, 20), align_corners=False), align_corners=False)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (images, shift))
    result = cdsvae.scaled_and_shifted(images, 0.7, shift, (2, 24, 20))
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(torch.autograd.grad(result.pow(2).sum(), (images, shift)), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10)


def test_a_sequence_draws_its_glyphs_once_as_every_frame_would():
    """``GlyphDecoder.sequence`` draws each s's glyphs once and places copies in every frame: the
    same frames, and the same gradients, as drawing them anew for every frame from [s, z_t]
    (``forward``), in training mode too (the batch norm sees the same statistics)."""
    torch.manual_seed(0)
    cfg = glyph_config()
    decoder = cdsvae.GlyphDecoder(cfg).train()
    static = torch.randn(3, cfg.static_dim, requires_grad=True)
    dynamic = torch.randn(3, 4, cfg.dynamic_dim)
    order = torch.randint(0, 2, (3, 4, 1)).expand(3, 4, 2).clone()
    order[..., 1] = 1 - order[..., 0]
    once = decoder.sequence(static, dynamic, order)
    latent = torch.cat([static[:, None].expand(3, 4, -1), dynamic], -1).flatten(0, 1)
    per_frame = decoder(latent, order.flatten(0, 1)).view(3, 4, 1, 32, 32)
    torch.testing.assert_close(once, per_frame, rtol=1e-5, atol=1e-5)
    weights = torch.rand_like(once)
    grads = [torch.autograd.grad((frames * weights).sum(), [static, *decoder.parameters()], allow_unused=True)
             for frames in (once, per_frame)]
    for grad, expected in zip(*grads):
        if expected is not None:
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("glyph_dynamic", [False, True])
def test_glyph_frames_are_the_union_of_the_glyphs_drawn_at_their_centres(glyph_dynamic):
    """p = 1 - (1 - p_background) prod_k (1 - p_k), each p_k glyph k (drawn from s's k-th part, and
    with ``glyph_dynamic`` from z_t beside it) moved to the k-th centre of z_t, written out pixel
    by pixel with one window per glyph."""
    torch.manual_seed(0)
    cfg = glyph_config(glyph_dynamic=glyph_dynamic)
    decoder = cdsvae.GlyphDecoder(cfg).eval()
    nn.init.zeros_(decoder.where.weight)
    with torch.no_grad():
        decoder.where.bias.copy_(torch.tensor([-0.25, -0.25, 0.125, 0.25]).mul(2).atanh())  # whole pixels
        latent = torch.randn(4, cfg.static_dim + cfg.dynamic_dim)
        probability = torch.sigmoid(decoder(latent)).double()
        inputs = [latent[:, 3 * k:3 * k + 3] for k in range(2)]
        if glyph_dynamic:
            inputs = [torch.cat([part, latent[:, 6:]], 1) for part in inputs]
        glyphs = torch.sigmoid(torch.stack([decoder.glyph(part) for part in inputs], 1)).view(4, 2, 1, 16, 16).double()
    background = torch.sigmoid(decoder.background).item()
    expected = torch.full((4, 1, 32, 32), 1 - background, dtype=torch.float64)
    for k, (left, top) in enumerate([(4, 4), (10, 12)]):          # centre c: top-left 16 + 16 c - 8
        window = expected[:, :, top:top + 16, left:left + 16]
        window *= 1 - glyphs[:, k] * (1 - 1e-6)
    torch.testing.assert_close(probability, 1 - expected, atol=2e-5, rtol=1e-4)
    if glyph_dynamic:                   # the places held (where: zero weights), z_t changes what is drawn
        same_places_other_z = latent.clone()
        same_places_other_z[:, 6:] += 1.0
        with torch.no_grad():
            assert not torch.allclose(decoder(same_places_other_z), decoder(latent), atol=1e-3)


def test_with_glyph_dynamic_each_frame_draws_its_glyphs_from_its_own_z():
    """``GlyphDecoder.sequence`` with ``glyph_dynamic``: frame t of a sequence is the frame that
    [s, z_t] alone draws (glyphs from [s_k, z_t]), and changing z at one step changes that frame only."""
    torch.manual_seed(0)
    cfg = glyph_config(glyph_dynamic=True)
    decoder = cdsvae.GlyphDecoder(cfg).eval()
    static, dynamic = torch.randn(3, cfg.static_dim), torch.randn(3, 4, cfg.dynamic_dim)
    with torch.no_grad():
        frames = decoder.sequence(static, dynamic)
        for t in range(4):
            torch.testing.assert_close(frames[:, t], decoder(torch.cat([static, dynamic[:, t]], 1)), rtol=1e-5, atol=1e-5)
        changed = dynamic.clone()
        changed[:, 2] += 1.0
        other = decoder.sequence(static, changed)
    torch.testing.assert_close(other[:, [0, 1, 3]], frames[:, [0, 1, 3]])
    assert not torch.allclose(other[:, 2], frames[:, 2], atol=1e-3)


def test_glyphs_are_matched_to_the_places_by_what_the_glimpses_show():
    """``match_glyphs``: codes that are two fixed patterns plus noise, the two places exchanged in
    some frames (in sequence 2 also in the first, whose order that sequence then keeps): every
    frame comes back in its sequence's first order, the order says which place each glyph took,
    and the gradient reaches each code once, through the glyph it was matched to."""
    torch.manual_seed(0)
    patterns = torch.randn(3, 1, 2, 16)
    codes = patterns + 0.3 * torch.randn(3, 6, 2, 16)
    exchanged = torch.zeros(3, 6, dtype=torch.bool)
    exchanged[:, 4:] = True
    exchanged[1, 1] = exchanged[2, 0] = True
    seen = torch.where(exchanged[..., None, None], codes.flip(2), codes).requires_grad_(True)
    matched, order = cdsvae.match_glyphs(seen)
    for b in range(3):
        expected = codes[b].flip(1) if exchanged[b, 0] else codes[b]
        torch.testing.assert_close(matched[b], expected, rtol=0, atol=0)
        flips = exchanged[b] ^ exchanged[b, 0]
        assert order[b].tolist() == [[1, 0] if flip else [0, 1] for flip in flips.tolist()]
    matched.mul(torch.arange(1.0, 3.0)[:, None]).sum().backward()        # glyph k's codes weighed k + 1
    weight = torch.where((exchanged ^ exchanged[:, :1])[..., None], torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(seen.grad, weight[..., None].expand_as(seen))


def test_the_glyph_order_draws_each_glyph_at_its_matched_place():
    """Glyph 0 at place 1 and glyph 1 at place 0 is the drawing with s's two parts exchanged;
    the order of an encoding makes the reconstruction, and its place per glyph in the frame."""
    torch.manual_seed(0)
    cfg = glyph_config()
    decoder = cdsvae.GlyphDecoder(cfg).eval()
    latent = torch.randn(4, cfg.static_dim + cfg.dynamic_dim)
    exchanged = torch.cat([latent[:, 3:6], latent[:, :3], latent[:, 6:]], 1)
    order = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]])
    with torch.no_grad():
        drawn = decoder(latent, order)
        torch.testing.assert_close(drawn[[0, 3]], decoder(latent[[0, 3]]))
        torch.testing.assert_close(drawn[[1, 2]], decoder(exchanged[[1, 2]]), rtol=1e-5, atol=1e-5)
        model = cdsvae.CDSVAE(cfg).eval()
        x = (torch.rand(2, 5, 1, 32, 32) > 0.8).float()
        encoding = model.encode(x)
        assert encoding.glyph_order.shape == (2, 5, 2) and sorted(encoding.glyph_order[0, 0].tolist()) == [0, 1]
        latents = torch.cat([encoding.static_mean[:, None].expand(2, 5, 6), encoding.dynamic_mean], -1).flatten(0, 1)
        frames = torch.sigmoid(model.frame_decoder(latents, encoding.glyph_order.flatten(0, 1))).view(2, 5, 1, 32, 32)
        torch.testing.assert_close(model.decode(encoding.static_mean, encoding.dynamic_mean, encoding.glyph_order), frames)
    assert cdsvae.CDSVAE(small_config()).eval().encode(torch.rand(2, 5, 3, 16, 16)).glyph_order is None


@pytest.mark.parametrize("options", [{}, {"explain_away": True, "motion_grad": False}, {"glyph_distort": 1.0},
                                     {"glyph_dynamic": True}])
def test_glyph_model_trains_every_parameter_swaps_samples_and_reloads(tmp_path, options):
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(glyph_config(**options))
    x = (torch.rand(4, 5, 1, 32, 32) > 0.8).float()
    loss, _ = model(x)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    model.eval()
    encoding = model.encode(x)
    a_b, _ = cdsvae.swap(model, x[:2], x[2:])
    torch.testing.assert_close(a_b, model.decode(encoding.static_mean[:2], encoding.dynamic_mean[2:]))
    assert cdsvae.generate(model, batch=2, frames=7).shape == (2, 7, 1, 32, 32)
    cdsvae.save_checkpoint(model, tmp_path / "glyphs.pt")
    reloaded = cdsvae.load_checkpoint(tmp_path / "glyphs.pt").eval()
    assert reloaded.cfg.glyphs == 2 and all(getattr(reloaded.cfg, k) == v for k, v in options.items())
    torch.testing.assert_close(reloaded.encode(x).static_mean, encoding.static_mean)


def test_the_other_glyphs_through_a_window_are_their_drawings_shifted_by_whole_pixels():
    """``GlyphDecoder.others_seen``: through glyph k's window, every other glyph j is its drawing
    shifted by 16 (c_j - c_k) pixels (centres on whole pixels: multiples of 1/16 of the
    half-width), the union of them written out pixel by pixel (three glyphs)."""
    torch.manual_seed(0)
    decoder = cdsvae.GlyphDecoder(glyph_config(glyphs=3))
    batch, steps = 2, 3
    glyphs = torch.rand(batch, 3, 1, 16, 16)
    pixels = torch.randint(-8, 9, (batch, steps, 3, 2))
    seen = decoder.others_seen(glyphs, pixels / 16).view(batch, steps, 3, 1, 16, 16)
    for b in range(batch):
        for t in range(steps):
            for k in range(3):
                none = torch.ones(16, 16)
                for j in set(range(3)) - {k}:
                    dx, dy = (int(v) for v in pixels[b, t, j] - pixels[b, t, k])
                    shifted = torch.zeros(16, 16)
                    for row in range(16):
                        for column in range(16):
                            if 0 <= row - dy < 16 and 0 <= column - dx < 16:
                                shifted[row, column] = glyphs[b, j, 0, row - dy, column - dx]
                    none = none * (1 - shifted * (1 - 1e-6))
                torch.testing.assert_close(seen[b, t, k, 0], 1 - none, atol=1e-5, rtol=0)


def test_explain_away_reads_each_glimpse_beside_the_other_glyphs_drawn_from_a_first_reading():
    """``explain_away`` (ours): with a glyph decoder that draws nothing, the second channel is
    empty and s is what the glimpses alone give (a model whose encoder has only the first
    channel's weights); with glyphs drawn, the other glyphs change s; training reaches every
    parameter, and the first reading, drawn without gradient, adds none."""
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(glyph_config(explain_away=True)).eval()
    plain = cdsvae.CDSVAE(glyph_config()).eval()
    state = model.state_dict()
    state["static_posterior.encoder.0.weight"] = state["static_posterior.encoder.0.weight"][:, :1]
    plain.load_state_dict(state)
    x = (torch.rand(3, 5, 1, 32, 32) > 0.7).float()
    with torch.no_grad():
        drawn = model.encode(x).static_mean
        last = model.frame_decoder.glyph[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, -40.0)                          # every glyph pixel ~ 4e-18
        torch.testing.assert_close(model.encode(x).static_mean, plain.encode(x).static_mean, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(drawn, plain.encode(x).static_mean, atol=1e-3)
    model = cdsvae.CDSVAE(glyph_config(explain_away=True))
    reads = []
    model.static_posterior.encoder.register_forward_hook(lambda module, inputs, out: reads.append(out.requires_grad))
    loss, _ = model(x)
    loss.backward()
    assert reads == [False, True]                                   # the first reading has no gradient
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_glyph_static_posterior_reads_the_frames_where_the_trajectory_puts_the_glyphs():
    """q(s | x, z): s depends on the frames only through the windows at z_t's centres: a pixel
    outside every window at every step leaves it unchanged, one inside changes it."""
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(glyph_config()).eval()
    nn.init.zeros_(model.frame_decoder.where.weight)
    nn.init.zeros_(model.frame_decoder.where.bias)                 # both glyphs at the middle: rows 8..23
    x = torch.rand(2, 5, 1, 32, 32)
    features = model.encode_frames(x)
    eps = torch.zeros(2, 5, 3)
    with torch.no_grad():
        static = model.posterior(x, features, torch.zeros(2, 6), eps).static_mean
        outside, inside = x.clone(), x.clone()
        outside[..., 0, 0] = 1 - x[..., 0, 0]
        inside[..., 16, 16] = 1 - x[..., 16, 16]
        assert torch.equal(model.posterior(outside, features, torch.zeros(2, 6), eps).static_mean, static)
        assert not torch.allclose(model.posterior(inside, features, torch.zeros(2, 6), eps).static_mean, static)


# --- determinism ------------------------------------------------------------------------------

def test_seeded_training_is_deterministic(tmp_path):
    from data_prep import shapes

    def run(seed, out):
        videos, labels = shapes.render(40, 0, size=16)
        data = cdsvae.Dataset("shapes", cdsvae.Split(videos, labels), cdsvae.Split(videos[:20], {k: v[:20] for k, v in labels.items()}),
                              shapes.KINDS, shapes.LABELS)
        cfg = small_config(epochs=2, batch_size=16, seed=seed)
        cdsvae.train(cfg, data, out, show_progress=False)
        return cdsvae.load_checkpoint(out / "last.pt").state_dict()

    first, second, other = run(0, tmp_path / "a"), run(0, tmp_path / "b"), run(1, tmp_path / "c")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()


def test_refined_encodings_lower_the_negative_elbo_per_sequence_and_leave_the_weights():
    """Ours (--refine-steps): encode refines the means (never the posterior samples), each
    sequence as it would alone, down the negative ELBO; the network is not changed."""
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(small_config(refine_steps=5, refine_lr=0.05)).eval()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.rand(4, 5, 3, 16, 16)

    def negative_elbo(encoding):
        with torch.no_grad():
            return float(model.negative_elbo(model.elbo_terms(x, encoding)))

    model.cfg.refine_steps = 0
    with torch.no_grad():
        plain = model.encode(x)
    model.cfg.refine_steps = 5
    with torch.no_grad():
        refined = model.encode(x)
        alone = model.encode(x[2:3])
        sampled = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        unrefined = model.encode(x, refine_steps=0)              # the call's steps over the config's
    model.cfg.refine_steps = 0
    with torch.no_grad():
        asked = model.encode(x, refine_steps=5)
    with torch.no_grad():
        sampled_plain = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(refined.static_mean, model.refine(x, plain, 5).static_mean)
    assert torch.equal(unrefined.static_mean, plain.static_mean) and torch.equal(asked.static_mean, refined.static_mean)
    assert negative_elbo(refined) < negative_elbo(plain)
    assert torch.allclose(alone.static_mean, refined.static_mean[2:3], atol=1e-5)
    assert torch.allclose(alone.dynamic_mean, refined.dynamic_mean[2:3], atol=1e-5)
    assert torch.equal(sampled.static, sampled_plain.static)
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_learned_mixture_prior_of_s_is_what_generation_draws_and_training_moves_it(tmp_path):
    """``static_prior`` K (ours): sample_static draws a component by its weight, then its Gaussian;
    the mixture's parameters get gradients from KL_s, are saved, and come back with the model."""
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), frames=4, static_dim=3, dynamic_dim=2, feature_dim=8,
                        hidden_dim=8, conv_width=4, static_prior=2)
    model = cdsvae.CDSVAE(cfg)
    with torch.no_grad():
        model.static_prior.means.copy_(torch.tensor([[5.0, 5.0, 5.0], [-5.0, 0.0, 5.0]]))
        model.static_prior.logvars.fill_(math.log(0.01))
        model.static_prior.logits.copy_(torch.tensor([math.log(0.8), math.log(0.2)]))
    draws = cdsvae.sample_static(model, 4000, torch.Generator().manual_seed(0))
    first = draws[:, 0] > 0
    assert float(first.float().mean()) == pytest.approx(0.8, abs=0.02)
    assert draws[first].mean(0).tolist() == pytest.approx([5.0, 5.0, 5.0], abs=0.01)
    assert draws[~first].std(0).tolist() == pytest.approx([0.1, 0.1, 0.1], rel=0.1)
    assert cdsvae.generate(model, batch=3, generator=torch.Generator().manual_seed(1)).shape == (3, 4, 3, 16, 16)
    loss, _ = model(torch.rand(4, 4, 3, 16, 16))
    loss.backward()
    for name in ("means", "logvars", "logits"):
        assert getattr(model.static_prior, name).grad.abs().sum() > 0, name
    cdsvae.save_checkpoint(model, tmp_path / "m.pt")
    loaded = cdsvae.load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.static_prior.means, model.static_prior.means)
    assert torch.equal(cdsvae.sample_static(loaded, 5, torch.Generator().manual_seed(2)),
                       cdsvae.sample_static(model, 5, torch.Generator().manual_seed(2)))


def test_the_fitted_mixture_finds_two_known_gaussians():
    """``fit_mixture`` (ours, ``cdsvae fit-prior``): EM on points drawn from a known mixture finds it."""
    generator = torch.Generator().manual_seed(0)
    first = torch.tensor([4.0, -2.0]) + torch.tensor([0.5, 1.0]) * torch.randn(3000, 2, generator=generator)
    second = torch.tensor([-4.0, 3.0]) + torch.tensor([1.0, 0.3]) * torch.randn(1000, 2, generator=generator)
    mixture = cdsvae.fit_mixture(torch.cat([first, second]), 2)
    found = mixture.means[:, 0].argsort(descending=True)          # the first Gaussian has the larger x
    assert mixture.means[found].flatten().tolist() == pytest.approx([4.0, -2.0, -4.0, 3.0], abs=0.08)
    assert mixture.logvars[found].exp().flatten().tolist() == pytest.approx([0.25, 1.0, 1.0, 0.09], rel=0.1)
    assert F.softmax(mixture.logits[found], 0).tolist() == pytest.approx([0.75, 0.25], abs=0.01)
    one = cdsvae.fit_mixture(first, 1)                      # K 1: the points' own mean and variance
    assert one.means[0].tolist() == pytest.approx(first.mean(0).tolist(), abs=1e-5)
    assert one.logvars[0].exp().tolist() == pytest.approx(first.var(0, unbiased=False).tolist(), rel=1e-4)
    draws = cdsvae.mixture_sample(mixture, 1, 20000, torch.Generator().manual_seed(1))
    assert float((draws[:, 0] > 0).float().mean()) == pytest.approx(0.75, abs=0.01)


def test_with_glyphs_the_fitted_prior_is_fitted_to_every_glyph_s_part_and_draws_each_part():
    """``fit_priors`` (ours) with glyphs: one mixture over the parts of the encoder's means of s
    of all the given sequences (K 1: their mean and variance), each part drawn from it; and one
    over the means of z_1."""
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(1, 32, 32), frames=3, static_dim=4, dynamic_dim=2, feature_dim=8,
                        hidden_dim=8, conv_width=4, glyphs=2, likelihood="bernoulli")
    model = cdsvae.CDSVAE(cfg).eval()
    videos = (np.random.default_rng(0).random((12, 3, 32, 32, 1)) > 0.8).astype(np.uint8) * 255
    mixture, first_step = cdsvae.fit_priors(model, videos, 1, "cpu")
    with torch.no_grad():
        encoding = model.encode(cdsvae.to_frames(videos, "cpu"), refine_steps=0)
    parts, first = encoding.static_mean.reshape(24, 2), encoding.dynamic_mean[:, 0]
    assert mixture.means[0].tolist() == pytest.approx(parts.mean(0).tolist(), abs=1e-5)
    assert mixture.logvars[0].exp().tolist() == pytest.approx(parts.var(0, unbiased=False).clamp_min(1e-6).tolist(), rel=1e-3)
    assert first_step.means[0].tolist() == pytest.approx(first.mean(0).tolist(), abs=1e-5)
    assert first_step.logvars[0].exp().tolist() == pytest.approx(first.var(0, unbiased=False).clamp_min(1e-6).tolist(), rel=1e-3)
    model.fitted_prior = mixture
    assert cdsvae.sample_static(model, 5, torch.Generator().manual_seed(0)).shape == (5, 4)
    assert "fitted" in cdsvae.static_prior_name(model)


def test_with_glyphs_each_part_of_s_is_drawn_from_one_mixture_on_its_own():
    """``static_prior`` K with ``glyphs`` G (ours): one mixture over a glyph's part of s; every part
    takes its own component, so the parts' components are independent."""
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(1, 32, 32), frames=4, static_dim=4, dynamic_dim=2, feature_dim=8,
                        hidden_dim=8, conv_width=4, glyphs=2, likelihood="bernoulli", static_prior=2)
    model = cdsvae.CDSVAE(cfg)
    assert model.static_prior.means.shape == (2, 2)
    with torch.no_grad():
        model.static_prior.means.copy_(torch.tensor([[5.0, 5.0], [-5.0, 0.0]]))
        model.static_prior.logvars.fill_(math.log(0.01))
        model.static_prior.logits.copy_(torch.tensor([math.log(0.8), math.log(0.2)]))
    draws = cdsvae.sample_static(model, 4000, torch.Generator().manual_seed(0))
    first = draws[:, [0, 2]] > 0                                        # each part's component
    assert first.float().mean(0).tolist() == pytest.approx([0.8, 0.8], abs=0.02)
    assert float((first[:, 0] & first[:, 1]).float().mean()) == pytest.approx(0.64, abs=0.02)
    assert draws[first[:, 1]][:, 2:].mean(0).tolist() == pytest.approx([5.0, 5.0], abs=0.01)
    assert cdsvae.generate(model, batch=3, generator=torch.Generator().manual_seed(1)).shape == (3, 4, 1, 32, 32)
