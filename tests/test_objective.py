"""The DDPM objective and the bound's terms against independent float64 oracles."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm_nodes.core import objective as obj
from ldm_nodes.core.schedule import TrainingSchedule

SCHEDULE = TrainingSchedule("linear", num_timesteps=100)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(50, generator=g, dtype=torch.float64) + 0.1, torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(obj.normal_kl(m1, v1, m2, v2), kl_divergence(Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt())))


def test_prior_kl():
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(2, 6)
    ab = SCHEDULE.alpha_bar[-1]
    expected = kl_divergence(Normal(ab.sqrt() * x0, (1 - ab).sqrt()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(obj.prior_kl(x0, SCHEDULE), expected)


def test_posterior_is_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from Bayes: precision alpha_t / beta_t + 1 / (1 - ab_{t-1}),
    mean = (sqrt(alpha_t) x_t / beta_t + sqrt(ab_{t-1}) x0 / (1 - ab_{t-1})) / precision."""
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    i = torch.tensor([1, 40, 99])
    mean, var = obj.posterior(x0, x_t, i, SCHEDULE)
    beta, ab_prev = SCHEDULE.betas[i][:, None], SCHEDULE.alpha_bar[i - 1][:, None]
    precision = (1 - beta) / beta + 1 / (1 - ab_prev)
    torch.testing.assert_close(var, 1 / precision)
    torch.testing.assert_close(mean, ((1 - beta).sqrt() * x_t / beta + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision)


def test_reverse_kl_is_the_weighted_eps_error_of_eq_12():
    """With sigma_t^2 = beta_tilde the variance terms vanish and L_{t-1} is
    beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) ||eps - eps_hat||^2 (Ho et al. eq. 12)."""
    g = torch.Generator().manual_seed(2)
    x0, eps, eps_hat = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    i = torch.tensor([1, 10, 50, 99])
    ab = SCHEDULE.alpha_bar[i][:, None]
    x_t = obj.q_sample(x0, ab.flatten(), eps)
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    kl = obj.reverse_kl(x0, x_t, x0_hat, i, SCHEDULE, "beta_tilde")
    beta = SCHEDULE.betas[i]
    sigma2 = beta * (1 - SCHEDULE.alpha_bar[i - 1]) / (1 - SCHEDULE.alpha_bar[i])
    weight = beta**2 / (2 * sigma2 * (1 - beta) * (1 - SCHEDULE.alpha_bar[i]))
    torch.testing.assert_close(kl, weight * (eps - eps_hat).square().sum(1))
    # with sigma_t^2 = beta_t the variance mismatch adds a constant 0.5 (log(b/bt) + bt/b - 1) per dim
    kl_beta = obj.reverse_kl(x0, x_t, x0_hat, i, SCHEDULE, "beta")
    const = 0.5 * (torch.log(beta / sigma2) + sigma2 / beta - 1) * 6
    torch.testing.assert_close(kl_beta, beta**2 / (2 * beta * (1 - beta) * (1 - SCHEDULE.alpha_bar[i]))
                               * (eps - eps_hat).square().sum(1) + const)


def test_model_variance_at_t1_uses_beta_tilde_2():
    x = torch.zeros(2, 1, dtype=torch.float64)
    bt2 = SCHEDULE.betas[1] * (1 - SCHEDULE.alpha_bar[0]) / (1 - SCHEDULE.alpha_bar[1])
    for variance in ("beta", "beta_tilde"):
        v = obj.model_variance(torch.tensor([0, 5]), SCHEDULE, variance, x)
        assert v[0].item() == pytest.approx(bt2.item(), rel=1e-12)
    assert obj.model_variance(torch.tensor([5]), SCHEDULE, "beta", x).item() == pytest.approx(SCHEDULE.betas[5].item())
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        obj.model_variance(0, SCHEDULE, "learned", x)


def test_discretized_decoder_bins_sum_to_one():
    """Over all 256 values of an 8-bit pixel the bin probabilities sum to 1 (the edge bins are open)."""
    values = (torch.arange(256, dtype=torch.float64) / 255 * 2 - 1).reshape(256, 1)
    for mean, var in ((0.3, 0.01), (-0.99, 1e-4), (1.5, 0.2), (0.0, 1e-6)):
        nll = obj.discretized_decoder_nll(values, torch.full_like(values, mean), torch.full_like(values, var))
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_decoder_matches_normal_cdf():
    x0 = torch.tensor([[-1.0, 1.0, 0.0, 2 / 255 * 10 - 1]], dtype=torch.float64)
    mean, var = torch.full_like(x0, 0.1), torch.full_like(x0, 0.04)
    n = Normal(torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    p = [n.cdf(f64(-1 + 1 / 255)), 1 - n.cdf(f64(1 - 1 / 255)), n.cdf(f64(1 / 255)) - n.cdf(f64(-1 / 255)),
         n.cdf(x0[0, 3] + 1 / 255) - n.cdf(x0[0, 3] - 1 / 255)]
    expected = -sum(math.log(float(q)) for q in p)
    assert obj.discretized_decoder_nll(x0, mean, var).item() == pytest.approx(expected, rel=1e-9)


def test_gaussian_decoder_nll_is_the_log_density():
    x0, mean, var = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.full((3, 4), 0.3, dtype=torch.float64)
    torch.testing.assert_close(obj.gaussian_decoder_nll(x0, mean, var), -Normal(mean, var.sqrt()).log_prob(x0).sum(1))


def test_l_simple_with_the_optimal_network_matches_the_closed_form():
    """For x0 ~ N(m, s^2): E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab), and the
    minimum L_simple is the mean over t of Var(eps | x_t) = ab s^2 / (ab s^2 + 1 - ab)."""
    m, s = 0.4, 0.6
    ab_table = SCHEDULE.alpha_bar.float()

    def optimal(x_t, t, context):
        ab = ab_table[t.long()].reshape(-1, 1)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * m) / (ab * s**2 + 1 - ab)

    g = torch.Generator().manual_seed(0)
    x0 = m + s * torch.randn(50_000, 1, generator=g)
    loss = obj.l_simple(optimal, x0, SCHEDULE, "eps", generator=g).item()
    ab = SCHEDULE.alpha_bar
    expected = (ab * s**2 / (ab * s**2 + 1 - ab)).mean().item()
    # Monte Carlo: the per-sample loss has std ~ expected, so the standard error is ~ expected / sqrt(N)
    assert loss == pytest.approx(expected, abs=4 * expected / math.sqrt(50_000) + 1e-3)
    # and a worse network scores worse
    assert obj.l_simple(lambda x_t, t, c: torch.zeros_like(x_t), x0, SCHEDULE, generator=g).item() > loss + 0.05


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_l_simple_is_zero_for_a_network_that_outputs_the_target(prediction):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 2, generator=g)
    # replay the draws l_simple makes (t first, then eps) to build the perfect answer
    replay = torch.Generator().manual_seed(4)
    t = torch.randint(0, 100, (8,), generator=replay)
    eps = torch.randn(x0.shape, generator=replay)
    target = obj.training_target(x0, eps, SCHEDULE.alpha_bar[t], prediction)
    loss = obj.l_simple(lambda x_t, t_in, c: target, x0, SCHEDULE, prediction, generator=torch.Generator().manual_seed(4))
    assert loss.item() < 1e-10
    with pytest.raises(ValueError, match="unknown prediction type"):
        obj.training_target(x0, eps, SCHEDULE.alpha_bar[t], "score")


def test_training_target_is_eps_v_or_x0_written_out():
    """eps (eq. 14), v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, eq. 14 there), or x0, per sample."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9, 0.2], dtype=torch.float64)
    v = torch.stack([math.sqrt(a) * e - math.sqrt(1 - a) * x for a, e, x in zip(ab.tolist(), eps, x0)])
    assert torch.equal(obj.training_target(x0, eps, ab, "eps"), eps)
    assert torch.equal(obj.training_target(x0, eps, ab, "x0"), x0)
    torch.testing.assert_close(obj.training_target(x0, eps, ab, "v"), v)
