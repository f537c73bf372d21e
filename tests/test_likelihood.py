"""The variational bound (core/likelihood.py) against a closed-form float64 oracle.

Oracle: data x0 ~ N(M, S^2) per dimension and a network that returns the exact posterior mean
    E[x0 | x_t] = m + g (x_t - sqrt(ab) m),  g = sqrt(ab) s^2 / (ab s^2 + 1 - ab)
(for m = M, s = S; other (m, s) give a mis-specified but still linear model). Every mean in the bound is then
linear in (x0, x_t), every term is a KL between Gaussians or a Gaussian log density, and its expectation over
x_t ~ q(x_t | x0) (and over the data) has a closed form. The formulas below are derived here by Gaussian
conditioning, independently of core/objective.py.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from ldm_nodes.core import likelihood as lik
from ldm_nodes.core.schedule import TrainingSchedule

F64 = torch.float64
M, S = 0.3, 0.5


def linear_beta_schedule(T, ab_first=0.999, ab_last=0.01):
    """A duck-typed schedule (only alpha_bar and num_timesteps): DDPM-style betas linear in t from
    1 - ab_first, the last beta found by bisection so that alpha_bar_T = ab_last."""
    b1 = 1 - ab_first

    def alpha_bar(end):
        return torch.cumprod(1 - torch.linspace(b1, end, T, dtype=F64), 0)

    lo, hi = b1, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if alpha_bar(mid)[-1] > ab_last else (lo, mid)
    return SimpleNamespace(alpha_bar=alpha_bar((lo + hi) / 2), num_timesteps=T)


class GaussianPosteriorMean:
    """network(x_t, t, context): E[x0 | x_t] for x0 ~ N(m, s^2), returned as eps, v or x0 (VP scale)."""

    def __init__(self, alpha_bar, prediction, m=M, s=S):
        self.alpha_bar, self.prediction, self.m, self.s = alpha_bar, prediction, m, s

    def __call__(self, x_t, t, context=None):
        assert t.dtype == torch.float32 and torch.equal(t, t.round())
        ab = self.alpha_bar[t.long()].reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = posterior_mean(x_t, ab, self.m, self.s)
        if self.prediction == "x0":
            return x0
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


def posterior_mean(x_t, ab, m, s):
    ab = torch.as_tensor(ab, dtype=F64)
    return m + ab.sqrt() * s**2 * (x_t - ab.sqrt() * m) / (ab * s**2 + 1 - ab)


def conditioning(ab_all, i):
    """q(x_{t-1} | x_t, x0) at index i >= 1 by conditioning the pair x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev),
    x_t = sqrt(alpha) x_{t-1} + sqrt(1 - alpha) z on x_t: mean sqrt(ab_prev) x0 + k (x_t - sqrt(ab) x0) with
    k = Cov / Var = sqrt(alpha) (1 - ab_prev) / (1 - ab), variance (1 - ab_prev) - k^2 (1 - ab).
    Returns (ab, ab_prev, k, variance, beta)."""
    ab, ab_prev = ab_all[i].item(), ab_all[i - 1].item()
    alpha = ab / ab_prev
    k = math.sqrt(alpha) * (1 - ab_prev) / (1 - ab)
    return ab, ab_prev, k, (1 - ab_prev) - k * k * (1 - ab), 1 - alpha


def decoder_variance(ab_all):
    """sigma_1^2 = beta_tilde_2 (SD_REFERENCE 5.6): the posterior variance at t = 2."""
    return conditioning(ab_all, 1)[3]


def gaussian_kl(m1, v1, m2, v2):
    return 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def oracle_term(i, x0, x_t, ab_all, variance, m=M, s=S):
    """The term at index i for one image at given (x0, x_t), in nats: L_0 if i == 0, else L_{t-1}, t = i + 1."""
    x0_hat = posterior_mean(x_t, ab_all[i], m, s)
    if i == 0:
        var1 = decoder_variance(ab_all)
        return (0.5 * math.log(2 * math.pi * var1) + (x0 - x0_hat) ** 2 / (2 * var1)).sum()
    ab, ab_prev, k, var_q, beta = conditioning(ab_all, i)
    mean_q = math.sqrt(ab_prev) * x0 + k * (x_t - math.sqrt(ab) * x0)
    mean_p = math.sqrt(ab_prev) * x0_hat + k * (x_t - math.sqrt(ab) * x0_hat)
    var_p = var_q if variance == "beta_tilde" else beta
    return gaussian_kl(mean_q, var_q, mean_p, var_p).sum()


def oracle_prior(x0_sq, ab_T):
    """L_T = KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) elementwise, from x0^2 (or E[x0^2])."""
    return 0.5 * (-math.log(1 - ab_T) + (1 - ab_T) + ab_T * x0_sq - 1)


def per_image(x):
    return x.flatten(1).sum(1)


def expected_term(i, dev2, ab_all, variance, m=M, s=S):
    """E over x_t ~ q(x_t | x0) of the term at index i, elementwise, given dev2 = (x0 - m)^2
    (or its expectation over the data). x0 - x0_hat = (1 - g sqrt(ab)) (x0 - m) - g sqrt(1 - ab) z, so
    E (x0 - x0_hat)^2 = (1 - g sqrt(ab))^2 dev2 + g^2 (1 - ab); mean_q - mean_p = c (x0 - x0_hat)."""
    ab = ab_all[i].item()
    g = math.sqrt(ab) * s**2 / (ab * s**2 + 1 - ab)
    err2 = (1 - g * math.sqrt(ab)) ** 2 * dev2 + g * g * (1 - ab)
    if i == 0:
        var1 = decoder_variance(ab_all)
        return 0.5 * math.log(2 * math.pi * var1) + err2 / (2 * var1)
    ab, ab_prev, k, var_q, beta = conditioning(ab_all, i)
    c = math.sqrt(ab_prev) - k * math.sqrt(ab)
    var_p = var_q if variance == "beta_tilde" else beta
    return 0.5 * (math.log(var_p / var_q) + var_q / var_p - 1) + c * c * err2 / (2 * var_p)


def expected_bound_given_x0(x0, ab_all, variance, m=M, s=S):
    """Closed-form E[bound | x0] per image [B], and of its sum over t = 2..T alone."""
    dev2 = (x0 - m) ** 2
    middle = per_image(sum(expected_term(i, dev2, ab_all, variance, m, s) for i in range(1, len(ab_all))))
    ends = per_image(oracle_prior(x0**2, ab_all[-1].item()) + expected_term(0, dev2, ab_all, variance, m, s))
    return ends + middle, middle


def data(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return M + S * torch.randn(n, *shape, generator=g, dtype=F64)


SCHEDULES = {"linear_betas": linear_beta_schedule(50),
             "zero_snr": TrainingSchedule("linear", 50, zero_terminal_snr=True)}


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_terms_match_gaussian_formulas_at_given_x0_and_xt(schedule_name, prediction, variance):
    """L_{t-1} (all t, including t = T at zero terminal SNR), continuous L_0 and L_T within 1e-6 relative."""
    schedule = SCHEDULES[schedule_name]
    if schedule_name == "zero_snr" and prediction == "eps":
        pytest.skip("eps prediction is refused at zero terminal SNR (test_zero_terminal_snr)")
    ab_all = schedule.alpha_bar
    net = GaussianPosteriorMean(ab_all, prediction)
    g = torch.Generator().manual_seed(3)
    i = torch.tensor([0, 0, 1, 2, 3, 17, 30, 48, 49, 49])
    x0 = torch.randn(len(i), 2, 1, 3, generator=g, dtype=F64)
    x_t = torch.randn(len(i), 2, 1, 3, generator=g, dtype=F64)
    terms = lik.bound_terms(net, x0, x_t, i, schedule, prediction, variance=variance, discrete=False)
    expected = torch.stack([oracle_term(int(j), a, b, ab_all, variance) for j, a, b in zip(i, x0, x_t)])
    assert torch.isfinite(terms).all()
    torch.testing.assert_close(terms, expected, rtol=1e-6, atol=1e-12)

    result = lik.variational_bound(net, x0, schedule, prediction, variance=variance, discrete=False,
                                   generator=torch.Generator().manual_seed(0))
    prior = per_image(oracle_prior(x0**2, ab_all[-1].item()))
    torch.testing.assert_close(result.prior, prior, rtol=1e-6, atol=1e-12)
    if schedule_name == "zero_snr":
        assert (result.prior == 0).all()  # q(x_T | x0) = N(0, I) exactly


def test_discrete_decoder_at_given_x0_and_x1():
    """8-bit L_0: -log of N(x0_hat(x_1), beta_tilde_2) over the pixel's bin, the edge bins open."""
    schedule = TrainingSchedule("linear", 100)
    ab_all = schedule.alpha_bar
    net = GaussianPosteriorMean(ab_all, "eps")
    g = torch.Generator().manual_seed(4)
    k = torch.tensor([0, 255, 1, 254, 127, 128, 40, 0, 255, 200, 3, 90], dtype=F64)
    x0 = (k / 255 * 2 - 1).reshape(3, 1, 2, 2)
    # noise at 1.5x its scale keeps every bin probability above the decoder's 1e-12 floor
    x1 = ab_all[0].sqrt() * x0 + 1.5 * (1 - ab_all[0]).sqrt() * torch.randn(x0.shape, generator=g, dtype=F64)
    terms = lik.bound_terms(net, x0, x1, torch.zeros(3, dtype=torch.long), schedule, "eps", discrete=True)
    mean, std = posterior_mean(x1, ab_all[0], M, S), math.sqrt(decoder_variance(ab_all))
    upper = torch.where(x0 == 1, 1.0, torch.special.ndtr((x0 + 1 / 255 - mean) / std))
    lower = torch.where(x0 == -1, 0.0, torch.special.ndtr((x0 - 1 / 255 - mean) / std))
    torch.testing.assert_close(terms, -torch.log(upper - lower).flatten(1).sum(1), rtol=1e-6, atol=0)
    # the t >= 2 terms do not depend on the decoder
    i = torch.tensor([1, 50, 99])
    torch.testing.assert_close(lik.bound_terms(net, x0, x1, i, schedule, "eps", discrete=True),
                               lik.bound_terms(net, x0, x1, i, schedule, "eps", discrete=False), rtol=0, atol=0)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_bound_averaged_over_noise_matches_closed_form_expectation(variance):
    """Full bound (every t, one x_t each) of a mis-specified model: the average over 2000 noise draws
    matches E[bound | x0] within 4 standard errors of that average."""
    schedule = linear_beta_schedule(20)
    net = GaussianPosteriorMean(schedule.alpha_bar, "v", m=0.1, s=0.8)
    x0 = data(2000, (1, 2, 2), seed=5)
    result = lik.variational_bound(net, x0, schedule, "v", variance=variance, discrete=False,
                                   generator=torch.Generator().manual_seed(6), batch_size=8192)
    expected, _ = expected_bound_given_x0(x0, schedule.alpha_bar, variance, m=0.1, s=0.8)
    diff = result.nats - expected
    assert result.unit == "nats/dim (latent)" and result.standard_error is None
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff)), (diff.mean(), diff.std())
    assert diff.std() > 0.01  # there is noise to average


def test_strided_estimate_is_unbiased_within_its_standard_error():
    """K = 8 timesteps of T = 100: over 3000 images, (T - 1) * mean of the K terms averages to the closed-form
    E[sum_{t>=2} L_{t-1} | x0] within 4 reported standard errors, and the reported standard error matches the
    estimate's actual spread."""
    schedule, T, K = linear_beta_schedule(100), 100, 8
    net = GaussianPosteriorMean(schedule.alpha_bar, "eps", m=0.1, s=0.8)
    x0 = data(3000, (1, 1, 2), seed=7)
    result = lik.variational_bound(net, x0, schedule, "eps", discrete=False, timesteps=K,
                                   generator=torch.Generator().manual_seed(8), batch_size=8192)
    assert result.terms.shape == (3000, K) and result.timesteps.shape == (3000, K)
    assert result.timesteps.min() >= 1 and result.timesteps.max() <= T - 1
    middle = result.nats - result.prior - result.decoder
    torch.testing.assert_close(middle, (T - 1) * result.terms.mean(1), rtol=1e-12, atol=1e-12)
    se = result.standard_error * result.dims  # nats per image
    torch.testing.assert_close(se, result.terms.std(1) * (T - 1) / math.sqrt(K), rtol=1e-12, atol=0)
    _, expected_middle = expected_bound_given_x0(x0, schedule.alpha_bar, "beta_tilde", m=0.1, s=0.8)
    error = middle - expected_middle
    rms_se = se.square().mean().sqrt()
    assert error.mean().abs() < 4 * rms_se / math.sqrt(len(error)), (error.mean(), rms_se)
    assert 0.8 < error.std() / rms_se < 1.25, (error.std(), rms_se)


def test_strided_estimate_agrees_with_the_full_sum_on_a_nonlinear_model():
    """A fixed non-Gaussian model (no closed form): the strided estimates of one image, repeated, average to
    the full estimate's average within 4 combined standard errors."""
    schedule, T, K, n = TrainingSchedule("linear", 50), 50, 5, 400

    def net(x_t, t, context):
        return torch.tanh(1.5 * x_t - t.to(x_t.dtype).reshape(-1, 1, 1, 1) / 40) + 0.2

    x0 = data(1, (1, 2, 2), seed=9).expand(n, -1, -1, -1)
    full = lik.variational_bound(net, x0, schedule, "eps", discrete=False, generator=torch.Generator().manual_seed(10),
                                 batch_size=8192)
    strided = lik.variational_bound(net, x0, schedule, "eps", discrete=False, timesteps=K,
                                    generator=torch.Generator().manual_seed(11), batch_size=8192)
    full_mid, strided_mid = full.terms.sum(1), (T - 1) * strided.terms.mean(1)
    se = math.sqrt(full_mid.var() / n + (strided.standard_error * strided.dims).square().mean() / n)
    assert (full_mid.mean() - strided_mid.mean()).abs() < 4 * se, (full_mid.mean(), strided_mid.mean(), se)


def test_expected_bound_stays_above_entropy_and_the_gap_shrinks_with_T():
    """Expectation over data and noise of the implementation's bound, exact: every term is quadratic in the
    jointly Gaussian (x0, x_t), so the 4 sigma points (x0, x_t) = mu +- sqrt(2) L e_j (L L^T = Cov) weighted
    1/4 give it exactly. At T = 10, 100, 1000 with alpha_bar_1 = 0.999 and alpha_bar_T = 0.01 held fixed
    (DDPM-style linear betas, beta_tilde variance) it matches the closed form, stays above the Gaussian's
    differential entropy 0.5 log(2 pi e s^2), and the gap shrinks. (A schedule that refines near t = 1 instead,
    e.g. linear in log-SNR, sends sigma_1^2 = beta_tilde_2 to 0 and L_0 up: the gap then grows.)"""
    entropy = 0.5 * math.log(2 * math.pi * math.e * S**2)
    gaps = []
    for T in (10, 100, 1000):
        schedule = linear_beta_schedule(T)
        ab = schedule.alpha_bar
        assert ab[0].item() == pytest.approx(0.999, rel=1e-12) and ab[-1].item() == pytest.approx(0.01, rel=1e-9)
        net = GaussianPosteriorMean(ab, "x0")
        x0_pts, xt_pts = [], []
        for j in range(T):
            a = ab[j].item()
            chol = torch.tensor([[S, 0.0], [math.sqrt(a) * S, math.sqrt(1 - a)]], dtype=F64)
            mu = torch.tensor([M, math.sqrt(a) * M], dtype=F64)
            for col in range(2):
                for sign in (1, -1):
                    point = mu + sign * math.sqrt(2) * chol[:, col]
                    x0_pts.append(point[0])
                    xt_pts.append(point[1])
        x0_pts = torch.stack(x0_pts).reshape(-1, 1, 1, 1)
        xt_pts = torch.stack(xt_pts).reshape(-1, 1, 1, 1)
        i = torch.arange(T).repeat_interleave(4)
        terms = lik.bound_terms(net, x0_pts, xt_pts, i, schedule, "x0", discrete=False).reshape(T, 4).mean(1)
        prior = lik.variational_bound(net, torch.tensor([M - S, M + S], dtype=F64).reshape(2, 1, 1, 1), schedule,
                                      "x0", discrete=False, timesteps=2).prior.mean()
        bound = prior + terms.sum()
        dev2 = torch.tensor(S**2, dtype=F64)
        closed = oracle_prior(M**2 + S**2, ab[-1].item()) + sum(expected_term(j, dev2, ab, "beta_tilde")
                                                                 for j in range(T))
        assert bound.item() == pytest.approx(closed.item(), rel=1e-6)
        gaps.append(bound.item() - entropy)
    assert all(gap > 0 for gap in gaps), gaps
    assert gaps[0] > gaps[1] > gaps[2], gaps


def test_full_bound_is_the_sum_of_its_terms_and_independent_of_batching():
    """All timesteps: total = (L_T + sum of the reported terms + L_0) / (D ln 2); the stacked network calls
    (with a per-image context) give the same numbers as one timestep per call."""
    schedule = TrainingSchedule("linear", 40)
    g = torch.Generator().manual_seed(12)
    x0 = torch.randint(0, 256, (3, 3, 4, 4), generator=g).to(F64) / 255 * 2 - 1
    context = torch.randn(3, 5, 8, generator=g, dtype=F64)

    def net(x_t, t, ctx):
        shift = ctx.mean((1, 2)).reshape(-1, 1, 1, 1)
        return 0.5 * torch.tanh(1.3 * x_t + t.to(x_t.dtype).reshape(-1, 1, 1, 1) / 7) + shift

    results = [lik.variational_bound(net, x0, schedule, "eps", context, generator=torch.Generator().manual_seed(13),
                                     batch_size=batch) for batch in (1, 1000)]
    r = results[0]
    assert r.unit == "bits/dim" and r.dims == 48 and r.standard_error is None
    assert torch.equal(r.timesteps, torch.arange(1, 40).expand(3, 39)) and r.terms.shape == (3, 39)
    torch.testing.assert_close(r.total, (r.prior + r.terms.sum(1) + r.decoder) / (48 * math.log(2)), rtol=1e-12, atol=0)
    for name in ("total", "terms", "prior", "decoder"):
        torch.testing.assert_close(getattr(results[1], name), getattr(r, name), rtol=1e-12, atol=0)


class UniformPixelPosteriorMean:
    """x0 prediction E[x0 | x_t] for pixels uniform over the 256 values of the 8-bit grid (Bayes-optimal)."""

    def __init__(self, alpha_bar):
        self.alpha_bar, self.grid = alpha_bar, torch.arange(256, dtype=F64) / 255 * 2 - 1

    def __call__(self, x_t, t, context=None):
        ab = self.alpha_bar[t.long()].reshape(-1, 1, 1, 1, 1)
        logits = -(x_t.unsqueeze(-1) - ab.sqrt() * self.grid) ** 2 / (2 * (1 - ab))
        return (logits.softmax(-1) * self.grid).sum(-1)


def test_uniform_noise_images_cost_at_least_8_bits_and_constant_images_little():
    """Uniform 8-bit noise has entropy log2(256) = 8 bits/dim, and the bound is a code length, so no model
    beats 8 on average; the Bayes-optimal denoiser comes close, a trivial one (always 0) pays far more.
    A constant image under a model that predicts it costs only L_0 (+ a tiny L_T): well under 1 bit/dim."""
    schedule = TrainingSchedule("linear", 1000)
    g = torch.Generator().manual_seed(14)
    noise = torch.randint(0, 256, (8, 3, 4, 4), generator=g).to(F64) / 255 * 2 - 1
    best = lik.variational_bound(UniformPixelPosteriorMean(schedule.alpha_bar), noise, schedule, "x0",
                                 generator=torch.Generator().manual_seed(15))
    mean, se = best.total.mean(), best.total.std() / math.sqrt(8)
    assert 8 - 4 * se < mean < 9, (best.total, se)  # measured: 8.65 +- 0.1 (8.08 with variance "beta")
    trivial = lik.variational_bound(lambda x, t, c: torch.zeros_like(x), noise, schedule, "x0", timesteps=50,
                                    generator=torch.Generator().manual_seed(16))
    assert (trivial.total > 20).all(), trivial.total

    constant = torch.full((2, 3, 4, 4), -1.0, dtype=F64)
    flat = lik.variational_bound(lambda x, t, c: torch.full_like(x, -1.0), constant, schedule, "x0", timesteps=10,
                                 generator=torch.Generator().manual_seed(17))
    assert (flat.total < 1).all() and (flat.terms == 0).all(), flat.total


def test_clip_x0_clips_the_prediction():
    schedule = TrainingSchedule("linear", 20)
    x0 = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64).reshape(1, 1, 2, 2)  # predictions beyond both ends

    def wild(x, t, c):
        return 3 * x + 0.5

    clipped = lik.variational_bound(wild, x0, schedule, "x0", clip_x0=True, generator=torch.Generator().manual_seed(0))
    by_hand = lik.variational_bound(lambda x, t, c: wild(x, t, c).clamp(-1, 1), x0, schedule, "x0",
                                    generator=torch.Generator().manual_seed(0))
    raw = lik.variational_bound(wild, x0, schedule, "x0", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clipped.nats, by_hand.nats, rtol=0, atol=0)
    assert not torch.allclose(raw.nats, clipped.nats)


def test_zero_terminal_snr():
    """alpha_bar_T = 0: L_T = 0 and every term finite for v and x0 prediction; eps prediction is refused."""
    schedule = TrainingSchedule("linear", 30, zero_terminal_snr=True)
    assert schedule.alpha_bar[-1].item() == 0
    x0 = data(2, (1, 2, 2), seed=18)
    for prediction in ("v", "x0"):
        r = lik.variational_bound(GaussianPosteriorMean(schedule.alpha_bar, prediction), x0, schedule, prediction,
                                  discrete=False, generator=torch.Generator().manual_seed(19))
        assert (r.prior == 0).all() and torch.isfinite(r.terms).all() and torch.isfinite(r.total).all()
    with pytest.raises(ValueError, match="^schedule: .*zero terminal SNR"):
        lik.variational_bound(GaussianPosteriorMean(schedule.alpha_bar, "eps"), x0, schedule, "eps", discrete=False)


def test_bad_inputs_name_the_input():
    schedule = TrainingSchedule("linear", 20)
    pixels = torch.zeros(1, 3, 2, 2, dtype=F64) + 1 / 255  # k = 128

    def net(x, t, c):
        return torch.zeros_like(x)

    def bound(x0=pixels, schedule=schedule, network=net, **kw):
        return lik.variational_bound(network, x0, schedule, **kw)

    bound()  # valid as given
    cases = [
        ("x0", dict(x0=torch.zeros(3, 2, 2, dtype=F64))),
        ("x0", dict(x0=torch.zeros(1, 3, 2, 2, dtype=torch.long))),
        ("x0", dict(network=SimpleNamespace(config=SimpleNamespace(in_channels=4)))),
        ("x0", dict(x0=pixels + 0.3 / 255)),  # off the 8-bit grid
        ("x0", dict(x0=pixels * 300)),  # outside [-1, 1]
        ("x0", dict(x0=pixels * float("nan"))),
        ("schedule", dict(schedule=None)),
        ("schedule", dict(schedule=SimpleNamespace(num_timesteps=20))),
        ("schedule", dict(schedule=SimpleNamespace(alpha_bar=schedule.alpha_bar.flip(0)))),
        ("schedule", dict(schedule=SimpleNamespace(  # decreasing, but below 0 at t = T
            alpha_bar=torch.cat([schedule.alpha_bar[:19], torch.tensor([-0.01], dtype=F64)]), num_timesteps=20))),
        ("schedule", dict(schedule=SimpleNamespace(  # flat between two steps: not strictly decreasing
            alpha_bar=torch.cat([schedule.alpha_bar[:5], schedule.alpha_bar[4:19]]), num_timesteps=20))),
        ("schedule", dict(schedule=SimpleNamespace(alpha_bar=schedule.alpha_bar, num_timesteps=10))),
        ("timesteps", dict(timesteps=0)),
        ("timesteps", dict(timesteps=1)),
        ("timesteps", dict(timesteps=20)),
        ("timesteps", dict(timesteps=True)),
        ("timesteps", dict(timesteps=5.0)),
        ("variance", dict(variance="learned")),
        ("prediction", dict(prediction="score")),
        ("context", dict(context=torch.zeros(2, 4, 8))),
        ("batch_size", dict(batch_size=0)),
    ]
    for name, kw in cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            bound(**kw)
    # the figures the messages give are the right ones
    with pytest.raises(ValueError, match=r"K <= T - 1 = 19 .*got 20"):
        bound(timesteps=20)
    with pytest.raises(ValueError, match=r"^context: batch 2 matches neither 1 nor x0's batch 1$"):
        bound(context=torch.zeros(2, 4, 8))
    bound(x0=pixels + 0.3 / 255, discrete=False)  # continuous data may lie anywhere
