"""Every term of the objective against an independent, direct computation."""
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

import cdsvae


def test_gaussian_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mean_q, mean_p = torch.randn(4, generator=generator), torch.randn(4, generator=generator)
    logvar_q, logvar_p = torch.randn(4, generator=generator) * 0.5, torch.randn(4, generator=generator) * 0.5
    closed = cdsvae.gaussian_kl(mean_q, logvar_q, mean_p, logvar_p).double()
    q = Normal(mean_q.double(), torch.exp(0.5 * logvar_q).double())
    p = Normal(mean_p.double(), torch.exp(0.5 * logvar_p).double())
    samples = q.sample((400_000,))
    log_ratio = q.log_prob(samples) - p.log_prob(samples)
    monte_carlo = log_ratio.mean(0)
    stderr = log_ratio.std(0) / math.sqrt(len(samples))
    assert torch.all((closed - monte_carlo).abs() < 5 * stderr + 1e-4), (closed, monte_carlo)
    assert torch.allclose(closed, kl_divergence(q, p), atol=1e-5)


def test_gaussian_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    mean, logvar = torch.randn(10), torch.randn(10)
    assert torch.allclose(cdsvae.gaussian_kl(mean, logvar, mean, logvar), torch.zeros(10), atol=1e-6)
    assert (cdsvae.gaussian_kl(mean, logvar, mean + 0.3, logvar) > 0).all()


def test_log_gaussian_matches_torch_distributions():
    x, mean, logvar = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    expected = Normal(mean, torch.exp(0.5 * logvar)).log_prob(x)
    assert torch.allclose(cdsvae.log_gaussian(x, mean, logvar), expected, atol=1e-5)


def explicit_contrastive(anchor, positive, tau):
    """Eq. (7)-(8) written out with loops: each of the 2B rows against its positive and the
    2B - 2 negatives from the minibatch, cosine similarity over tau."""
    rows = [r.double() for r in list(anchor) + list(positive)]
    n, batch = len(rows), len(anchor)

    def cosine(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    total = 0.0
    for i in range(n):
        partner = (i + batch) % n
        numerator = math.exp(cosine(rows[i], rows[partner]) / tau)
        denominator = sum(math.exp(cosine(rows[i], rows[j]) / tau) for j in range(n) if j != i)
        total += math.log(numerator / denominator)
    return math.log(n - 1) + total / n


@pytest.mark.parametrize("batch,dim,tau", [(1, 3, 0.5), (5, 7, 0.5), (8, 16, 0.1)])
def test_contrastive_mi_matches_explicit_loop(batch, dim, tau):
    generator = torch.Generator().manual_seed(batch)
    anchor, positive = torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
    value = cdsvae.contrastive_mi(anchor, positive, tau)
    assert value.item() == pytest.approx(explicit_contrastive(anchor, positive, tau), abs=1e-4)


def test_contrastive_mi_is_symmetric_and_rewards_matching_views():
    anchor = torch.randn(16, 8)
    noise = 0.05 * torch.randn(16, 8)
    close = cdsvae.contrastive_mi(anchor, anchor + noise, 0.5)
    assert close.item() == pytest.approx(cdsvae.contrastive_mi(anchor + noise, anchor, 0.5).item(), abs=1e-5)
    assert close > cdsvae.contrastive_mi(anchor, torch.randn(16, 8), 0.5)
    assert close <= math.log(31) + 1e-6  # the InfoNCE bound never exceeds log(2B - 1)


def brute_force_log_marginal(sample_i, means, logvars, dataset_size):
    """log q(v_i) ~= log (1 / (B N)) sum_j prod_d N(v_id; mean_jd, var_jd), in float64."""
    densities = [float(Normal(m.double(), torch.exp(0.5 * lv.double())).log_prob(sample_i.double()).sum().exp())
                 for m, lv in zip(means, logvars)]
    return math.log(sum(densities) / (len(means) * dataset_size))


def tiny_posterior(batch, dim, seed, steps=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, dim) if steps is None else (batch, steps, dim)
    mean = torch.randn(*shape, generator=generator, dtype=torch.float64)
    logvar = 0.3 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    sample = mean + torch.exp(0.5 * logvar) * torch.randn(*shape, generator=generator, dtype=torch.float64)
    return sample, mean, logvar


def test_mws_mi_x_matches_brute_force():
    sample, mean, logvar = tiny_posterior(4, 3, seed=1)
    dataset_size = 50
    expected = 0.0
    for i in range(4):
        log_conditional = float(Normal(mean[i], torch.exp(0.5 * logvar[i])).log_prob(sample[i]).sum())
        expected += log_conditional - brute_force_log_marginal(sample[i], mean, logvar, dataset_size)
    expected /= 4
    assert cdsvae.mws_mi_x(sample, mean, logvar, dataset_size).item() == pytest.approx(expected, rel=1e-9)


def test_mws_mi_x_of_trajectories_is_the_mean_of_brute_force_per_step_estimates():
    sample, mean, logvar = tiny_posterior(3, 2, seed=2, steps=4)
    expected = 0.0
    for i in range(3):
        for t in range(4):
            log_conditional = float(Normal(mean[i, t], torch.exp(0.5 * logvar[i, t])).log_prob(sample[i, t]).sum())
            expected += log_conditional - brute_force_log_marginal(sample[i, t], mean[:, t], logvar[:, t], 10)
    assert cdsvae.mws_mi_x(sample, mean, logvar, 10).item() == pytest.approx(expected / 12, rel=1e-9)


def test_mws_mi_zs_matches_brute_force():
    batch, steps, dataset_size = 3, 2, 20
    static, static_mean, static_logvar = tiny_posterior(batch, 4, seed=3)
    dynamic, dynamic_mean, dynamic_logvar = tiny_posterior(batch, 2, seed=4, steps=steps)
    expected = 0.0
    for i in range(batch):
        log_q_s = brute_force_log_marginal(static[i], static_mean, static_logvar, dataset_size)
        for t in range(steps):
            log_q_z = brute_force_log_marginal(dynamic[i, t], dynamic_mean[:, t], dynamic_logvar[:, t], dataset_size)
            joint_sample = torch.cat([static[i], dynamic[i, t]])
            joint_means = torch.cat([static_mean, dynamic_mean[:, t]], dim=1)
            joint_logvars = torch.cat([static_logvar, dynamic_logvar[:, t]], dim=1)
            log_q_joint = brute_force_log_marginal(joint_sample, joint_means, joint_logvars, dataset_size)
            expected += log_q_joint - log_q_z - log_q_s
    expected /= batch * steps
    value = cdsvae.mws_mi_zs(static, static_mean, static_logvar, dynamic, dynamic_mean, dynamic_logvar,
                             dataset_size)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def small_model(**overrides):
    values = dict(frame_shape=(3, 16, 16), static_dim=6, dynamic_dim=3, feature_dim=8, hidden_dim=10,
                  conv_width=4, dataset_size=100)
    cfg = cdsvae.Config(**{**values, **overrides})
    return cdsvae.CDSVAE(cfg)


@pytest.mark.parametrize("flip, passes", [(False, 1), (True, 2)])
def test_an_order_free_q_s_is_not_run_again_on_the_shuffled_view(monkeypatch, flip, passes):
    """With --static-pool mean the shuffled video's s is x's own: forward runs q(s|x) once; the
    mirrored content view (--content-flip) is another video and needs a second pass."""
    torch.manual_seed(0)
    model = small_model(static_pool="mean", content_flip=flip)
    calls = []
    forward = model.static_posterior.forward
    monkeypatch.setattr(model.static_posterior, "forward", lambda features: calls.append(features.shape) or forward(features))
    model(torch.rand(4, 5, 3, 16, 16))
    assert len(calls) == passes


def brute_force_mws_zs(static, static_mean, static_logvar, dynamic, dynamic_mean, dynamic_logvar, size):
    """I(z;s) by minibatch-weighted sampling, per time step, written out with loops."""
    batch, steps = dynamic.shape[:2]
    total = 0.0
    for i in range(batch):
        log_q_s = brute_force_log_marginal(static[i], static_mean, static_logvar, size)
        for t in range(steps):
            log_q_z = brute_force_log_marginal(dynamic[i, t], dynamic_mean[:, t], dynamic_logvar[:, t], size)
            log_q_joint = brute_force_log_marginal(torch.cat([static[i], dynamic[i, t]]),
                                                   torch.cat([static_mean, dynamic_mean[:, t]], 1),
                                                   torch.cat([static_logvar, dynamic_logvar[:, t]], 1), size)
            total += log_q_joint - log_q_z - log_q_s
    return total / (batch * steps)


def direct_terms(model, x, content_view_order, motion_view, noise):
    """Every term of eq. (6) computed from the model's layers, with loops and torch.distributions,
    not with the code under test: the LSTM cell of the dynamic posterior is written out."""
    cfg, batch, steps = model.cfg, x.shape[0], x.shape[1]
    static_eps, dynamic_eps, motion_eps = noise
    features = model.encode_frames(torch.cat([x, motion_view]))       # one pass, as BatchNorm saw it
    features, motion_features = features[:batch], features[batch:]
    posterior = model.dynamic_posterior

    def rollout(frame_features, eps):
        samples, means, logvars = [], [], []
        z, h, c = torch.zeros(batch, cfg.dynamic_dim), torch.zeros(batch, cfg.hidden_dim), torch.zeros(batch, cfg.hidden_dim)
        for t in range(steps):
            gates = posterior.input_proj(frame_features[:, t]) + posterior.recurrent(torch.cat([z, h], 1))
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            mean, logvar = posterior.head(h).chunk(2, 1)
            z = mean + torch.exp(0.5 * logvar) * eps[:, t]
            samples.append(z), means.append(mean), logvars.append(logvar)
        return torch.stack(samples, 1), torch.stack(means, 1), torch.stack(logvars, 1)

    static_mean, static_logvar = model.static_posterior(features)
    static = static_mean + torch.exp(0.5 * static_logvar) * static_eps
    dynamic, dynamic_mean, dynamic_logvar = rollout(features, dynamic_eps)
    prior_mean, prior_logvar = model.dynamic_prior(dynamic)
    frames = torch.sigmoid(model.decode_logits(static, dynamic))
    shuffled = torch.stack([features[b, content_view_order[b]] for b in range(batch)])
    static_content_mean = model.static_posterior(shuffled)[0]
    motion_mean = rollout(motion_features, motion_eps)[1]
    posterior_s = Normal(static_mean, torch.exp(0.5 * static_logvar))
    if cfg.static_prior:      # ours: a learned mixture; KL_s at the posterior's sample
        mixture = model.static_prior
        prior_s = MixtureSameFamily(Categorical(logits=mixture.logits),
                                    Independent(Normal(mixture.means, torch.exp(0.5 * mixture.logvars)), 1))
        kl_s = float((Independent(posterior_s, 1).log_prob(static) - prior_s.log_prob(static)).sum()) / batch
    else:
        kl_s = float(kl_divergence(posterior_s, Normal(0.0, 1.0)).sum()) / batch
    return {
        "recon": float(((frames - x) ** 2).sum()) / batch,
        "kl_s": kl_s,
        "kl_z": float(kl_divergence(Normal(dynamic_mean, torch.exp(0.5 * dynamic_logvar)),
                                    Normal(prior_mean, torch.exp(0.5 * prior_logvar))).sum()) / batch,
        "mi_sx": explicit_contrastive(static_mean, static_content_mean, cfg.tau),
        "mi_zx": explicit_contrastive(dynamic_mean.flatten(1), motion_mean.flatten(1), cfg.tau),
        "mi_zs": brute_force_mws_zs(static.double(), static_mean.double(), static_logvar.double(), dynamic.double(),
                                    dynamic_mean.double(), dynamic_logvar.double(), cfg.dataset_size),
    }


@pytest.mark.parametrize("alpha_static, static_pool, static_prior", [(None, "lstm", 0), (1.9, "lstm", 0), (None, "mean", 0),
                                                                    (None, "lstm", 3)])
def test_every_term_of_forward_equals_an_independent_computation(monkeypatch, alpha_static, static_pool, static_prior):
    """alpha_static None: eq. (6)'s one alpha for both KL terms. static_pool "mean": forward takes
    x's own s for the shuffled view's; the direct computation runs q(s|x) on the shuffled frames.
    static_prior 3 (ours): KL_s against a learned mixture of 3, by torch.distributions."""
    torch.manual_seed(0)
    model = small_model(alpha=0.7, alpha_static=alpha_static, beta=3.0, gamma=2.0, static_pool=static_pool,
                        static_prior=static_prior)
    if static_prior:          # weights and variances of their own, so that a slip in either shows
        with torch.no_grad():
            model.static_prior.logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
            model.static_prior.logvars.normal_(0.0, 0.5)
    batch, steps = 5, 4
    x, view = torch.rand(batch, steps, 3, 16, 16), torch.rand(batch, steps, 3, 16, 16)
    order = torch.stack([torch.randperm(steps) for _ in range(batch)])
    noise = [torch.randn(batch, 6), torch.randn(batch, steps, 3), torch.randn(batch, steps, 3)]
    handed_out = iter(noise)
    monkeypatch.setattr(cdsvae.CDSVAE, "noise", staticmethod(lambda shape, like: next(handed_out)))
    monkeypatch.setattr(cdsvae, "content_order", lambda b, t, device=None, generator=None: order)
    monkeypatch.setattr(cdsvae, "motion_augment", lambda frames: view)
    loss, terms = model(x)
    with torch.no_grad():
        direct = direct_terms(model, x, order, view, noise)
        # the test can fail: the content and motion views exchanged give other terms
        swapped = direct_terms(model, x, order, x[torch.arange(batch)[:, None], order], noise)
    for name, value in direct.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert swapped["mi_zx"] != pytest.approx(direct["mi_zx"], rel=1e-3)
    weight_static = 0.7 if alpha_static is None else alpha_static
    expected_loss = (direct["recon"] + weight_static * direct["kl_s"] + 0.7 * direct["kl_z"]
                     - 3.0 * (direct["mi_sx"] + direct["mi_zx"]) + 2.0 * direct["mi_zs"])
    assert loss.item() == pytest.approx(expected_loss, rel=1e-4)


def test_training_passes_its_dataset_size_to_the_mws_estimates(tmp_path):
    from data_prep import shapes
    videos, labels = shapes.render(40, 0, size=16)
    data = cdsvae.Dataset("shapes", cdsvae.Split(videos, labels), cdsvae.Split(videos, labels),
                          shapes.KINDS, shapes.LABELS)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), static_dim=4, dynamic_dim=2, feature_dim=8, hidden_dim=8,
                        conv_width=4, batch_size=16, epochs=1)
    cdsvae.train(cfg, data, tmp_path / "all", show_progress=False)
    assert cdsvae.read_checkpoint(tmp_path / "all" / "last.pt")["config"].dataset_size == 40
    cdsvae.train(cfg, data, tmp_path / "held", show_progress=False, eval_every=100)   # 10% held out
    assert cdsvae.read_checkpoint(tmp_path / "held" / "last.pt")["config"].dataset_size == 36


def test_dsvae_baseline_leaves_mi_terms_out_of_the_loss():
    torch.manual_seed(0)
    model = small_model(mi="off")
    loss, terms = model(torch.rand(5, 4, 3, 16, 16))
    assert loss.item() == pytest.approx((terms["recon"] + terms["kl_s"] + terms["kl_z"]).item(), rel=1e-6)
    assert {"mi_sx", "mi_zx", "mi_zs"} <= set(terms)  # still logged


def test_reconstruction_term_is_summed_squared_error_per_sequence():
    torch.manual_seed(0)
    model = small_model()
    captured = []
    model.frame_decoder.register_forward_hook(lambda module, args, out: captured.append(out))
    x = torch.rand(3, 4, 3, 16, 16)
    _, terms = model(x)
    decoded = torch.sigmoid(captured[0].detach().view(3, 4, 3, 16, 16))   # the decoder gives logits
    direct = sum(float(((decoded[b] - x[b]) ** 2).sum()) for b in range(3)) / 3
    assert terms["recon"].item() == pytest.approx(direct, rel=1e-5)


def test_bernoulli_reconstruction_term_is_the_negative_log_likelihood_per_sequence():
    torch.manual_seed(0)
    model = small_model(likelihood="bernoulli")
    captured = []
    model.frame_decoder.register_forward_hook(lambda module, args, out: captured.append(out))
    x = torch.rand(3, 4, 3, 16, 16)
    x[0, 0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])         # the end points of [0, 1]
    _, terms = model(x)
    probability = torch.sigmoid(captured[0].detach().double().view(3, 4, 3, 16, 16))
    x = x.double()
    log_likelihood = [float((x[b] * probability[b].log() + (1 - x[b]) * (1 - probability[b]).log()).sum())
                      for b in range(3)]
    assert terms["recon"].item() == pytest.approx(-sum(log_likelihood) / 3, rel=1e-5)
    # decode gives the Bernoulli means, the pixels in [0, 1]
    encoding = model.encode(x[:1].float())
    mean = model.decode(encoding.static, encoding.dynamic)
    assert torch.allclose(mean, torch.sigmoid(model.decode_logits(encoding.static, encoding.dynamic)))


def test_mean_rollouts_for_the_dynamic_contrastive_term(monkeypatch):
    """mi_rollout="mean": I(z;x) compares the trajectories of x and of its motion view obtained
    with the posterior mean fed back at each step (eps = 0), whatever noise the ELBO's rollout got."""
    torch.manual_seed(0)
    model = small_model(mi_rollout="mean")
    x, view = torch.rand(4, 5, 3, 16, 16), torch.rand(4, 5, 3, 16, 16)
    monkeypatch.setattr(cdsvae, "motion_augment", lambda frames: view)
    _, terms = model(x)
    with torch.no_grad():
        def mean_rollout(features):
            means, z = [], torch.zeros(4, 3)
            h = c = torch.zeros(4, 10)
            gates_x = model.dynamic_posterior.input_proj(features)
            for t in range(5):                          # the LSTM cell written out, z_t = mean_t
                gates = gates_x[:, t] + model.dynamic_posterior.recurrent(torch.cat([z, h], 1))
                i, f, g, o = gates.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                z = model.dynamic_posterior.head(h).chunk(2, 1)[0]
                means.append(z)
            return torch.stack(means, 1).flatten(1)
        features = model.encode_frames(torch.cat([x, view]))   # one pass, as BatchNorm saw it
        direct = explicit_contrastive(mean_rollout(features[:4]), mean_rollout(features[4:]), model.cfg.tau)
    assert terms["mi_zx"].item() == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("rollout", ["sampled", "mean"])
def test_without_motion_grad_i_z_x_pulls_x_towards_a_fixed_motion_view(monkeypatch, rollout):
    """motion_grad=False (ours): the same value of I(z;x) as with the gradient (in eval mode, where
    BatchNorm does not see the motion view's batch apart), and its gradient is that of InfoNCE
    between x's trajectory and the motion view's, the latter computed without gradient."""
    torch.manual_seed(0)
    with_grad = small_model(mi_rollout=rollout).eval()
    fixed = small_model(mi_rollout=rollout, motion_grad=False).eval()
    fixed.load_state_dict(with_grad.state_dict())
    batch, steps = 4, 5
    x, view = torch.rand(batch, steps, 3, 16, 16), torch.rand(batch, steps, 3, 16, 16)
    noise = [torch.randn(batch, 6), torch.randn(batch, steps, 3), torch.randn(batch, steps, 3)]
    monkeypatch.setattr(cdsvae, "motion_augment", lambda frames: view)
    terms = {}
    for name, model in (("with_grad", with_grad), ("fixed", fixed)):
        handed_out = iter(noise)
        monkeypatch.setattr(cdsvae.CDSVAE, "noise", staticmethod(lambda shape, like: next(handed_out)))
        terms[name] = model.objective_terms(x)["mi_zx"]
    assert terms["fixed"].item() == pytest.approx(terms["with_grad"].item(), rel=1e-5)
    eps, motion_eps = (torch.zeros(batch, steps, 3),) * 2 if rollout == "mean" else noise[1:]
    anchor = fixed.dynamic_posterior(fixed.encode_frames(x), eps)[1]
    with torch.no_grad():
        target = fixed.dynamic_posterior(fixed.encode_frames(view), motion_eps)[1]
    direct = cdsvae.contrastive_mi(anchor.flatten(1), target.flatten(1), fixed.cfg.tau)
    parameters = [p for p in fixed.parameters() if p.requires_grad]
    got = torch.autograd.grad(terms["fixed"], parameters, allow_unused=True)
    expected = torch.autograd.grad(direct, parameters, allow_unused=True)
    for mine, theirs in zip(got, expected):
        if theirs is None:
            assert mine is None or not mine.abs().sum() > 0
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    full = torch.autograd.grad(terms["with_grad"], list(with_grad.parameters()), allow_unused=True)
    assert any(theirs is not None and not torch.allclose(f, theirs, rtol=1e-3, atol=1e-6)
               for f, theirs in zip(full, expected) if f is not None)   # the test can fail


def test_without_motion_grad_the_motion_view_leaves_the_running_statistics_to_x():
    """In training the motion view, a batch of its own without gradient, is normalised by its own
    statistics but does not move BatchNorm's running statistics: they are those of x's frames."""
    torch.manual_seed(0)
    fixed = small_model(motion_grad=False)
    alone = small_model(motion_grad=False)
    alone.load_state_dict(fixed.state_dict())
    x = torch.rand(4, 5, 3, 16, 16)
    fixed(x)
    alone.encode_frames(x)
    norms = [(a, b) for a, b in zip(fixed.frame_encoder.modules(), alone.frame_encoder.modules())
             if isinstance(a, torch.nn.BatchNorm2d)]
    assert norms and all(float(a.momentum) == 0.1 for a, _ in norms)
    for a, b in norms:
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert not torch.equal(a.running_mean, torch.zeros_like(a.running_mean))


def test_mws_ablation_uses_mws_estimates_everywhere():
    torch.manual_seed(0)
    model = small_model(mi="mws")
    _, terms = model(torch.rand(5, 4, 3, 16, 16))
    # MWS estimates carry the + log(B N) offset; contrastive ones are bounded by log(2B - 1).
    assert terms["mi_sx"] > math.log(9)


@pytest.mark.skipif(not cdsvae.cpu_has_native_bf16(),
                    reason="oneDNN has no bf16 LSTM on a CPU without native bf16")
@pytest.mark.parametrize("glyphs", [0, 2])
def test_objective_stays_fp32_under_bf16_autocast(glyphs):
    torch.manual_seed(0)
    model = small_model(glyphs=glyphs, **({"frame_shape": (3, 32, 32)} if glyphs else {}))
    x = torch.rand(5, 4, 3, *model.cfg.frame_shape[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = model(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(value.dtype == torch.float32 for value in terms.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("setting", ["content_flip", "content_half"])
def test_content_view_variants_take_i_s_x_against_their_view(monkeypatch, setting):
    """Ours: with content_flip the content view of I(s;x) is x shuffled and mirrored left-right;
    with content_half it is the first half of the shuffled video."""
    torch.manual_seed(0)
    model = small_model(**{setting: True})
    batch, steps = 4, 5
    x, view = torch.rand(batch, steps, 3, 16, 16), torch.rand(batch, steps, 3, 16, 16)
    order = torch.stack([torch.randperm(steps) for _ in range(batch)])
    monkeypatch.setattr(cdsvae, "content_order", lambda b, t, device=None, generator=None: order)
    monkeypatch.setattr(cdsvae, "motion_augment", lambda frames: view)
    _, terms = model(x)
    with torch.no_grad():
        mirrored = [x.flip(-1)] if setting == "content_flip" else []
        features = model.encode_frames(torch.cat([x, view, *mirrored]))     # one pass, as BatchNorm saw it
        source = features[2 * batch:] if mirrored else features[:batch]
        kept = order if mirrored else order[:, :steps // 2]
        content = torch.stack([source[b, kept[b]] for b in range(batch)])
        direct = explicit_contrastive(model.static_posterior(features[:batch])[0],
                                      model.static_posterior(content)[0], model.cfg.tau)
    assert terms["mi_sx"].item() == pytest.approx(direct, rel=1e-4)
    setattr(model.cfg, setting, False)
    _, plain = model(x)
    assert plain["mi_sx"].item() != pytest.approx(direct, rel=1e-3)


def test_club_estimate_equals_the_direct_mean_of_gaussian_log_likelihoods():
    generator = torch.Generator().manual_seed(0)
    static, mean = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    logvar = torch.randn(5, 3, generator=generator) * 0.5
    log_q = [[float(Normal(mean[j].double(), torch.exp(0.5 * logvar[j]).double()).log_prob(static[i].double()).sum())
              for j in range(5)] for i in range(5)]
    direct = sum(log_q[i][i] for i in range(5)) / 5 - sum(map(sum, log_q)) / 25
    assert cdsvae.club_mi(static, mean, logvar).item() == pytest.approx(direct, rel=1e-5)
    # it can fail: with s a function of z it is large, with s unrelated to z near zero
    trajectories = torch.randn(256, 4, generator=generator)
    related = cdsvae.club_mi(trajectories[:, :2] * 3, trajectories[:, :2] * 3, torch.zeros(256, 2))
    unrelated = cdsvae.club_mi(torch.randn(256, 2, generator=generator), torch.zeros(256, 2), torch.zeros(256, 2))
    assert related > 5 and abs(unrelated) < 0.2


def assert_critic_gradients(model, critic, estimate, critic_loss):
    """A learned critic's estimate trains the encoders and not the critic; its loss only the critic."""
    encoders = list(model.static_posterior.parameters()) + list(model.dynamic_posterior.parameters())
    critic = list(critic.parameters())

    def grads(value, params):
        return torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)

    assert all(g is None for g in grads(estimate, critic))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(estimate, encoders[:1] + encoders[-1:]))
    assert all(g is None for g in grads(critic_loss, encoders))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(critic_loss, critic[-2:]))


def test_club_trains_its_critic_on_detached_samples_and_its_estimate_only_the_encoders():
    torch.manual_seed(0)
    model = small_model(club=1.0, club_start=0, frames=4)
    terms = model.objective_terms(torch.rand(5, 4, 3, 16, 16))
    assert_critic_gradients(model, model.static_from_dynamic, terms["mi_zs_club"], terms["club_nll"])


def test_critic_grad_static_leaves_the_estimates_and_s_gradients_as_they_are_and_takes_z_out_of_their_reach():
    """--critic-grad static (ours): the CLUB and pair-critic estimates have the same values and
    send the same gradients to q(s|x) as with "both", and none to q(z|x) (without glyphs, where s
    does not read z)."""
    x = torch.rand(5, 4, 3, 16, 16)
    estimates = {}
    for critic_grad in ("both", "static"):
        torch.manual_seed(0)
        model = small_model(club=1.0, pair_critic=1.0, club_start=0, frames=4, critic_grad=critic_grad)
        torch.manual_seed(1)                            # the same samples and views for both
        terms = model.objective_terms(x)
        for name in ("mi_zs_club", "mi_zs_ratio"):
            static = torch.autograd.grad(terms[name], list(model.static_posterior.parameters()), retain_graph=True)
            dynamic = torch.autograd.grad(terms[name], list(model.dynamic_posterior.parameters()),
                                          retain_graph=True, allow_unused=True)
            estimates[critic_grad, name] = terms[name].item(), static, dynamic
    for name in ("mi_zs_club", "mi_zs_ratio"):
        (both, both_static, both_dynamic), (alone, static, dynamic) = estimates["both", name], estimates["static", name]
        assert alone == pytest.approx(both, rel=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(static, both_static))
        assert any(g.abs().sum() > 0 for g in static)
        assert all(g is None for g in dynamic)
        assert any(g is not None and g.abs().sum() > 0 for g in both_dynamic)


def test_club_weight_ramps_in_after_club_start_and_the_loss_adds_the_estimate_and_the_critic_likelihood():
    torch.manual_seed(0)
    model = small_model(alpha=0.7, beta=3.0, gamma=2.0, club=2.0, club_start=4, frames=4)   # ramp: 2 steps
    x = torch.rand(5, 4, 3, 16, 16)
    weights = []
    for _ in range(7):
        loss, terms = model(x)
        weights.append(model.critic_weight(model.cfg.club))
        expected = (terms["recon"] + 0.7 * (terms["kl_s"] + terms["kl_z"]) - 3.0 * (terms["mi_sx"] + terms["mi_zx"])
                    + 2.0 * terms["mi_zs"] + weights[-1] * terms["mi_zs_club"] + terms["club_nll"])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weights == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    model.eval()
    model(x)                                        # evaluation does not count as a step
    assert int(model.club_step) == 7
    assert "static_from_dynamic.net.0.weight" not in small_model().state_dict()   # off: the model as before


def test_pair_critic_terms_equal_the_classifier_written_out_per_pair():
    torch.manual_seed(0)
    model = small_model(pair_critic=1.0, club_start=0, frames=4)
    model.eval()                                        # the posterior's BatchNorm as in the direct pass
    torch.manual_seed(1)
    terms = model.objective_terms(torch.rand(5, 4, 3, 16, 16))
    torch.manual_seed(1)
    x = torch.rand(5, 4, 3, 16, 16)
    posterior = model.sample_posterior(x, model.encode_views(x).features)
    critic = model.pair_critic.net.double()             # the terms are taken: the direct pass in float64
    static, dynamic = posterior.static.detach().double(), posterior.dynamic.detach().double()

    def logit(i, j):                                    # s of sequence i with z_1:T of sequence j
        pair = torch.cat([static[i]] + [dynamic[j, t] for t in range(4)])
        for layer in critic:
            pair = layer(pair)
        return pair.item()

    own = [logit(i, i) for i in range(5)]
    neighbours = [logit(i, (i - 1) % 5) for i in range(5)]
    log_sigmoid = lambda v: -math.log1p(math.exp(-v))
    assert terms["mi_zs_ratio"].item() == pytest.approx(sum(own) / 5, rel=1e-4, abs=1e-6)
    direct_nll = -sum(log_sigmoid(v) for v in own) / 5 - sum(log_sigmoid(-v) for v in neighbours) / 5
    assert terms["pair_critic_nll"].item() == pytest.approx(direct_nll, rel=1e-4)


def test_density_ratio_estimate_finds_the_mutual_information_of_correlated_gaussians():
    """Trained as the model trains it (the logistic loss, neighbours' z as the mismatched pairs),
    the classifier's mean logit comes within a quarter of I = -log(1 - rho^2) / 2 for each of 2
    dimensions of (s, z) correlated with rho = 0.8 (1.02 nats in all), and near 0 for independent
    ones."""
    def estimate(rho):
        torch.manual_seed(0)
        critic = cdsvae.PairCritic(cdsvae.Config(static_dim=2, frames=1, dynamic_dim=2), width=64)
        optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
        for step in range(600):
            dynamic = torch.randn(512, 1, 2)
            static = rho * dynamic[:, 0] + math.sqrt(1 - rho ** 2) * torch.randn(512, 2)
            joint, mismatched = critic(static, dynamic), critic(static, dynamic.roll(1, dims=0))
            loss = torch.nn.functional.softplus(-joint).mean() + torch.nn.functional.softplus(mismatched).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        dynamic = torch.randn(4096, 1, 2)
        static = rho * dynamic[:, 0] + math.sqrt(1 - rho ** 2) * torch.randn(4096, 2)
        with torch.no_grad():
            return cdsvae.density_ratio_mi(critic(static, dynamic)).item()

    assert estimate(0.8) == pytest.approx(-2 * 0.5 * math.log(1 - 0.8 ** 2), rel=0.25)
    assert abs(estimate(0.0)) < 0.1


def test_pair_critic_trains_on_detached_samples_its_estimate_only_the_encoders_and_the_loss_adds_both():
    torch.manual_seed(0)
    model = small_model(alpha=0.7, beta=3.0, gamma=2.0, club=2.0, pair_critic=3.0, club_start=4, frames=4)
    x = torch.rand(5, 4, 3, 16, 16)
    terms = model.objective_terms(x)
    assert_critic_gradients(model, model.pair_critic, terms["mi_zs_ratio"], terms["pair_critic_nll"])
    weights = []
    for _ in range(6):
        loss, terms = model(x)
        weights.append(model.critic_weight(model.cfg.pair_critic))
        expected = (terms["recon"] + 0.7 * (terms["kl_s"] + terms["kl_z"]) - 3.0 * (terms["mi_sx"] + terms["mi_zx"])
                    + 2.0 * terms["mi_zs"] + model.critic_weight(2.0) * terms["mi_zs_club"] + terms["club_nll"]
                    + terms["pair_critic_nll"] + weights[-1] * terms["mi_zs_ratio"])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weights == [0.0, 0.0, 0.0, 1.5, 3.0, 3.0]     # the first objective_terms call counted a step too
    dsvae = small_model(mi="off", pair_critic=3.0, club_start=0, frames=4)
    loss, terms = dsvae(x)                              # DSVAE: the estimate logged, the critic still trained
    expected = terms["recon"] + dsvae.cfg.alpha * (terms["kl_s"] + terms["kl_z"]) + terms["pair_critic_nll"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "pair_critic.net.0.weight" not in small_model(club=1.0).state_dict()   # off: the model as before


@pytest.mark.parametrize("content_half, glyph_contrast, glyph_distort, static_prior",
                         [(False, False, 0.0, 0), (True, False, 0.0, 0), (True, True, 0.0, 0), (False, False, 1.0, 0),
                          (False, False, 0.0, 3)])
def test_glyph_terms_equal_a_direct_computation(monkeypatch, content_half, glyph_contrast, glyph_distort, static_prior):
    """With --glyphs 2 (ours): q(s | x, z) read from the glimpses at z_t's centres, each cut
    with its own affine grid, the two places of every frame matched to the glyphs by the cosine
    of their codes to the mean of the frames before (then of all); the frames the union of the
    glyphs drawn at their matched places; the Bernoulli reconstruction, KL_s and I(s;x) written out
    per frame: the shuffled video's s is x's own; with content_half (ours) the content view's s is
    the mean of the glyphs' codes over the shuffled video's first half; with glyph_contrast (ours)
    the InfoNCE rows are the glyphs' parts of s; with glyph_distort (ours) the content view's s is
    read from every frame's glimpse of each glyph at its matched place resampled through that
    glyph's affine map; with static_prior 3 (ours) KL_s is log q(s|x) minus each glyph's part's log
    density under one mixture of 3, by torch.distributions."""
    torch.manual_seed(0)
    model = small_model(frame_shape=(1, 32, 32), glyphs=2, likelihood="bernoulli", content_half=content_half,
                        glyph_contrast=glyph_contrast, glyph_distort=glyph_distort, static_prior=static_prior).eval()
    if static_prior:          # weights and variances of their own, so that a slip in either shows
        with torch.no_grad():
            model.static_prior.logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
            model.static_prior.logvars.normal_(0.0, 0.5)
    batch, steps = 3, 4
    x, view = (torch.rand(batch, steps, 1, 32, 32) > 0.7).float(), torch.rand(batch, steps, 1, 32, 32)
    noise = [torch.randn(batch, 6), torch.randn(batch, steps, 3), torch.randn(batch, steps, 3)]
    handed_out = iter(noise)
    content = torch.stack([torch.randperm(steps) for _ in range(batch)])
    monkeypatch.setattr(cdsvae.CDSVAE, "noise", staticmethod(lambda shape, like: next(handed_out)))
    monkeypatch.setattr(cdsvae, "motion_augment", lambda frames: view)
    monkeypatch.setattr(cdsvae, "content_order", lambda b, t, device=None, generator=None: content)
    affine = torch.tensor([[0.9, -0.2, 0.0], [0.3, 1.1, 0.0]]) + 0.05 * torch.randn(2 * batch, 2, 3)
    affine[:, :, 2] = 0.0
    monkeypatch.setattr(cdsvae, "glyph_distortions", lambda count, strength, device=None: affine[:count])
    _, terms = model(x)
    decoder, posterior = model.frame_decoder, model.static_posterior
    with torch.no_grad():
        features = model.encode_frames(torch.cat([x, view]))[:batch]
        dynamic = model.dynamic_posterior(features, noise[1])[0]

        def centre(z, k):                                      # (2,): x, y in [-0.5, 0.5]
            return 0.5 * torch.tanh(decoder.where(z))[2 * k:2 * k + 2]

        def window(frame, c, scale, size):                     # frame read at scale * u + c
            theta = torch.tensor([[[scale, 0.0, float(c[0])], [0.0, scale, float(c[1])]]])
            grid = torch.nn.functional.affine_grid(theta, (1, 1, size, size), align_corners=False)
            return torch.nn.functional.grid_sample(frame[None], grid, align_corners=False)[0]

        def cosine(u, v):
            return float(u @ v / (u.norm() * v.norm()))

        def matched(seen, reference):                          # the order of the two places closest to it
            kept = cosine(seen[0], reference[0]) + cosine(seen[1], reference[1])
            return (0, 1) if kept >= cosine(seen[1], reference[0]) + cosine(seen[0], reference[1]) else (1, 0)

        means, logvars, orders, half_means = [], [], [], []
        for b in range(batch):
            seen = [[posterior.encoder(window(x[b, t], centre(dynamic[b, t], place), 0.5, 16)[None])[0]
                     for place in range(2)] for t in range(steps)]
            total = list(seen[0])
            for t in range(1, steps):
                order = matched(seen[t], [part / t for part in total])
                total = [total[k] + seen[t][order[k]] for k in range(2)]
            orders.append([matched(seen[t], [part / steps for part in total]) for t in range(steps)])
            parts = [torch.stack([seen[t][orders[b][t][k]] for t in range(steps)]).mean(0) for k in range(2)]
            mean, logvar = zip(*(posterior.head(part).chunk(2) for part in parts))
            means.append(torch.cat(mean)), logvars.append(torch.cat(logvar))
            def view_code(t, k):                               # glyph k in the content view
                glimpse = window(x[b, t], centre(dynamic[b, t], orders[b][t][k]), 0.5, 16)
                if glyph_distort:
                    grid = torch.nn.functional.affine_grid(affine[2 * b + k][None], (1, 1, 16, 16), align_corners=False)
                    glimpse = torch.nn.functional.grid_sample(glimpse[None], grid, align_corners=False)[0]
                return posterior.encoder(glimpse[None])[0]

            view_frames = content[b, :steps // 2].tolist() if content_half else range(steps)
            halves = [torch.stack([view_code(t, k) for t in view_frames]).mean(0) for k in range(2)]
            half_means.append(torch.cat([posterior.head(half).chunk(2)[0] for half in halves]))
        assert (1, 0) in sum(orders, []) and (0, 1) in sum(orders, [])     # both orders are taken here
        static_mean, static_logvar = torch.stack(means), torch.stack(logvars)
        static = static_mean + torch.exp(0.5 * static_logvar) * noise[0]
        background = torch.sigmoid(decoder.background)
        recon = 0.0
        for b in range(batch):
            for t in range(steps):
                none = 1 - background
                for k in range(2):
                    glyph = torch.sigmoid(decoder.glyph(static[b, 3 * k:3 * k + 3][None]))[0]
                    place = centre(dynamic[b, t], orders[b][t][k])
                    none = none * (1 - window(glyph, -2.0 * place, 2.0, 32) * (1 - 1e-6))
                p = (1 - none).double()
                recon -= float((x[b, t] * p.log() + (1 - x[b, t]) * (1 - p).log()).sum())
    posterior_s = Normal(static_mean, torch.exp(0.5 * static_logvar))
    kl_s = float(kl_divergence(posterior_s, Normal(0.0, 1.0)).sum()) / batch
    if static_prior:
        mixture = model.static_prior
        part_prior = MixtureSameFamily(Categorical(logits=mixture.logits),
                                       Independent(Normal(mixture.means, torch.exp(0.5 * mixture.logvars)), 1))
        with torch.no_grad():
            log_prior = part_prior.log_prob(static[:, :3]) + part_prior.log_prob(static[:, 3:])
        kl_s = float((Independent(posterior_s, 1).log_prob(static) - log_prior).sum()) / batch
    direct = {"recon": recon / batch,
              "kl_s": kl_s,
              "mi_sx": explicit_contrastive(static_mean, static_mean, model.cfg.tau)}
    if content_half or glyph_distort:
        half_mean = torch.stack(half_means)
        direct["mi_sx"] = (explicit_contrastive(static_mean.reshape(2 * batch, 3), half_mean.reshape(2 * batch, 3),
                                                model.cfg.tau) if glyph_contrast else
                           explicit_contrastive(static_mean, half_mean, model.cfg.tau))
    for name, value in direct.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-4), name


@pytest.mark.parametrize("glyphs", [0, 2])
def test_refine_takes_adam_steps_down_an_independently_computed_negative_elbo(glyphs):
    """Ours (--refine-steps): the posterior means moved by Adam, written out here, on
    -log p(x|s,z) + alpha_static KL(N(s, var_s) || N(0, I)) + alpha sum_t KL(N(z_t, var_z) || p(z_t|z_<t)),
    the encoder's variances and glyph order held, per sequence (the batch's sum)."""
    torch.manual_seed(0)
    shape = (1, 32, 32) if glyphs else (3, 16, 16)
    model = small_model(frame_shape=shape, glyphs=glyphs, likelihood="bernoulli" if glyphs else "gaussian",
                        alpha=0.7, alpha_static=1.9, refine_lr=0.02).eval()
    x = (torch.rand(3, 4, *shape) > 0.6).float() if glyphs else torch.rand(3, 4, *shape)
    with torch.no_grad():
        encoding = model.encode(x)                         # refine_steps 0: the encoder's means
    static, dynamic = encoding.static_mean.clone(), encoding.dynamic_mean.clone()
    moments = [torch.zeros_like(static), torch.zeros_like(dynamic)], [torch.zeros_like(static), torch.zeros_like(dynamic)]
    for step in range(1, 4):
        point = [static.clone().requires_grad_(), dynamic.clone().requires_grad_()]
        p = torch.sigmoid(model.decode_logits(point[0], point[1], encoding.glyph_order)).double()
        if glyphs:
            recon = -(x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum()
        else:
            recon = ((p - x) ** 2).sum()
        prior_mean, prior_logvar = model.dynamic_prior(point[1])
        kl_s = kl_divergence(Normal(point[0], torch.exp(0.5 * encoding.static_logvar)), Normal(0.0, 1.0)).sum()
        kl_z = kl_divergence(Normal(point[1], torch.exp(0.5 * encoding.dynamic_logvar)),
                             Normal(prior_mean, torch.exp(0.5 * prior_logvar))).sum()
        gradients = torch.autograd.grad(recon + 1.9 * kl_s + 0.7 * kl_z, point)
        for index, gradient in enumerate(gradients):         # Adam with torch's defaults, by hand
            first, second = moments[0][index], moments[1][index]
            first.mul_(0.9).add_(0.1 * gradient.float())
            second.mul_(0.999).add_(0.001 * gradient.float() ** 2)
            update = 0.02 * (first / (1 - 0.9 ** step)) / ((second / (1 - 0.999 ** step)).sqrt() + 1e-8)
            (static if index == 0 else dynamic).sub_(update)
    refined = model.refine(x, encoding, 3)
    assert torch.allclose(refined.static_mean, static, atol=2e-5)
    assert torch.allclose(refined.dynamic_mean, dynamic, atol=2e-5)
    assert torch.equal(refined.static, refined.static_mean) and torch.equal(refined.dynamic, refined.dynamic_mean)
    assert torch.equal(refined.static_logvar, encoding.static_logvar)
    if glyphs:
        assert torch.equal(refined.glyph_order, encoding.glyph_order)
    assert not torch.allclose(static, encoding.static_mean, atol=1e-3)      # the steps moved the means
