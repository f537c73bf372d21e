"""The DDPM training objective and the terms of its variational bound (Ho et al. 2020).

Indexing: the paper counts t = 1..T; arrays here count i = 0..T-1, so index i is the paper's
t = i + 1, alpha_bar at index -1 (the paper's t = 0) is 1, and x_t at index i is the paper's x_{i+1}.

Bound (eq. 5): L = L_T + sum_{t>1} L_{t-1} + L_0 with
    L_T     = KL(q(x_T | x_0) || N(0, I))
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      (Gaussians, eq. 6-7 and 8)
    L_0     = -log p(x_0 | x_1)                                   (section 3.3 decoder)
Every term is summed over the non-batch dimensions and returned per sample, in nats.
"""
import math

import torch

from .denoiser import PREDICTIONS

VARIANCES = ("beta_tilde", "beta")


def _per_sample(a, x):
    """alpha_bar-like values [B] shaped to broadcast against x [B, ...]."""
    return a.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _sum(x):
    return x.flatten(1).sum(1)


# --- training: Algorithm 1 --------------------------------------------------------------------

def q_sample(x0, alpha_bar, eps):
    """Eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, alpha_bar of shape [B]."""
    ab = _per_sample(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def training_target(x0, eps, alpha_bar, prediction):
    """What the network learns to output: eps (eq. 14), v = sqrt(ab) eps - sqrt(1 - ab) x0
    (Salimans & Ho 2022), or x0."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    ab = _per_sample(alpha_bar, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def l_simple(network, x0, schedule, prediction="eps", context=None, generator=None, t=None, eps=None):
    """Algorithm 1 / eq. 14: t ~ Uniform({1..T}), eps ~ N(0, I),
    loss = || target - network(x_t, t) ||^2, averaged over the batch and the dimensions.
    Randomness comes from the CPU `generator`, then moves to x0's device; t [B] and eps, when given,
    are used instead (the trainer draws them for a whole global batch, see train.Draws)."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator) if t is None else t
    eps = (torch.randn(x0.shape, generator=generator) if eps is None else eps).to(x0.device, x0.dtype)
    alpha_bar = schedule.alpha_bar[t].to(x0.device)
    x_t = q_sample(x0, alpha_bar, eps)
    out = network(x_t, t.to(x0.device, torch.float32), context)
    return (out.float() - training_target(x0, eps, alpha_bar, prediction).float()).square().mean()


# --- the variational bound --------------------------------------------------------------------

def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)), elementwise."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def prior_kl(x0, schedule):
    """L_T = KL(q(x_T | x_0) || N(0, I)), per sample. No parameters: small for a good schedule."""
    ab = schedule.alpha_bar[-1].to(x0.device, x0.dtype)
    return _sum(normal_kl(ab.sqrt() * x0, (1 - ab).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0)))


def posterior(x0, x_t, i, schedule):
    """Eq. 6-7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde) at index i >= 1 (i: [B] long).
    mu_tilde = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t,
    beta_tilde = (1 - ab_prev) / (1 - ab) beta."""
    ab, ab_prev, beta = _coefficients(schedule, i, x0)
    mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x_t
    return mean, (1 - ab_prev) / (1 - ab) * beta


def model_variance(i, schedule, variance, like):
    """The fixed reverse-process variance sigma_t^2 (section 3.2): beta_tilde_t or beta_t. At t = 1,
    where beta_tilde_1 = 0, both use beta_tilde_2, as the reference implementation does."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
    i = torch.as_tensor(i)
    ab, ab_prev, beta = _coefficients(schedule, i.clamp(min=1), like)
    var = (1 - ab_prev) / (1 - ab) * beta if variance == "beta_tilde" else beta
    at_t1 = (i == 0).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))
    return torch.where(at_t1, _beta_tilde_2(schedule, like), var)


def _beta_tilde_2(schedule, like):
    ab = schedule.alpha_bar.to(like.dtype)
    return (1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0])


def _coefficients(schedule, i, like):
    alpha_bar = schedule.alpha_bar.to(like.device, like.dtype)
    ab_prev_all = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    i = torch.as_tensor(i, device=like.device)
    ab, ab_prev = _per_sample(alpha_bar[i], like), _per_sample(ab_prev_all[i], like)
    return ab, ab_prev, 1 - ab / ab_prev


def reverse_kl(x0, x_t, x0_hat, i, schedule, variance="beta_tilde"):
    """L_{t-1} at index i >= 1: KL(q(x_{t-1} | x_t, x_0) || N(mu_theta, sigma_t^2)), where
    mu_theta = mu_tilde(x_t, x0_hat) is eq. 11 written through the predicted x0."""
    mean, var = posterior(x0, x_t, i, schedule)
    mean_theta, _ = posterior(x0_hat, x_t, i, schedule)
    sigma2 = model_variance(i, schedule, variance, x0)
    return _sum(normal_kl(mean, var, mean_theta, sigma2))


def _std_normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_decoder_nll(x0, mean, var):
    """Section 3.3, eq. 13: -log of N(mean, var) integrated over each pixel's bin
    [x - 1/255, x + 1/255], the edge bins open to -inf at x = -1 and +inf at x = 1.
    x0 holds 8-bit values mapped to [-1, 1]; per sample, in nats."""
    std = var.sqrt()
    upper = torch.where(x0 >= 1 - 1e-3, torch.ones_like(x0), _std_normal_cdf((x0 + 1 / 255 - mean) / std))
    lower = torch.where(x0 <= -1 + 1e-3, torch.zeros_like(x0), _std_normal_cdf((x0 - 1 / 255 - mean) / std))
    return -_sum(torch.log((upper - lower).clamp(min=1e-12)))


def gaussian_decoder_nll(x0, mean, var):
    """L_0 for continuous data (latents): -log N(x0; mean, var), per sample, in nats (can be negative)."""
    return _sum(0.5 * (torch.log(2 * math.pi * var) + (x0 - mean) ** 2 / var))
