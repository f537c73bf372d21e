"""Samplers against closed forms, each other, and themselves (determinism, precision, errors).

Closed-form oracle: for data x0 ~ N(m, s^2) the exact denoiser is
    D(x, sigma) = E[x0 | x0 + sigma eps = x] = (s^2 x + sigma^2 m) / (s^2 + sigma^2),
and x ~ N(m, s^2 + sigma^2) at every sigma. Starting from that marginal at sigma_max, a correct
sampler ends at mean m and standard deviation s, up to its discretisation error (and, for the
stochastic ones, the Monte Carlo error of the batch).
"""
import math

import pytest
import torch

from ldm_nodes.core.samplers import SAMPLERS, NonFiniteError, get_sampler
from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule

M, S = 0.7, 0.5
N_SAMPLES = 40_000


def gaussian_denoiser(x, sigma):
    return (S**2 * x + sigma**2 * M) / (S**2 + sigma**2)


def start(sigmas, dtype=torch.float64, seed=0):
    """x at sigmas[0] drawn from the exact marginal, the generator, and the standard-normal draw z."""
    g = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn(N_SAMPLES, 1, 1, 1, generator=g, dtype=dtype)
    return M + math.sqrt(S**2 + float(sigmas[0]) ** 2) * z, g, z


def karras(steps):
    return sampling_schedule(TrainingSchedule("scaled_linear"), steps, "karras").sigmas


# The probability-flow ODE of a Gaussian is affine: x(sigma) = m + sqrt(s^2 + sigma^2) z, so a
# deterministic sampler must map each start to m + s z. Bounds on the worst sample at 50 karras
# steps; first-order rules (euler; ddim with eta 0 is the same step) carry O(h) error.
DETERMINISTIC_BOUND = {"euler": 0.1, "ddim": 0.1, "heun": 2e-3, "dpmpp_2m": 2e-3, "plms": 3e-3}
# Stochastic rules end in distribution: 200 steps, tolerances on the relative std error. Ancestral
# sampling from q(x_s | x_t, x0_hat) ignores the spread of x0 given x_t, a first-order bias (-1.7%
# at 200 steps); the Monte Carlo error of the std is S / sqrt(2 N) = 0.35%.
STOCHASTIC_STD_TOLERANCE = {"ddpm": 0.035, "euler_ancestral": 0.035, "dpmpp_2m_sde": 0.015}


def test_every_sampler_is_checked_against_the_closed_form():
    assert set(DETERMINISTIC_BOUND) | set(STOCHASTIC_STD_TOLERANCE) == set(SAMPLERS)


@pytest.mark.parametrize("name", DETERMINISTIC_BOUND)
def test_deterministic_sampler_follows_the_exact_flow(name):
    sigmas = karras(50)
    x, g, z = start(sigmas)
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=g)
    assert (out - (M + S * z)).abs().max().item() < DETERMINISTIC_BOUND[name]


@pytest.mark.parametrize("name", STOCHASTIC_STD_TOLERANCE)
def test_stochastic_sampler_ends_in_the_data_distribution(name):
    sigmas = karras(200)
    x, g, _ = start(sigmas)
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=g)
    assert abs(out.mean().item() - M) < 0.01  # Monte Carlo error of the mean: S / sqrt(N) = 0.0025
    assert abs(out.std().item() / S - 1) < STOCHASTIC_STD_TOLERANCE[name], out.std().item()


def test_stopping_short_of_sigma_zero_fails_the_oracle():
    """The oracle is sharp enough to catch a sampler that leaves the last noise in."""
    sigmas = karras(50)
    x, _, z = start(sigmas)
    broken = SAMPLERS["heun"](gaussian_denoiser, x, sigmas[:-1])  # ends at sigma_min, not 0
    assert (broken - (M + S * z)).abs().max().item() > DETERMINISTIC_BOUND["heun"]


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order(name, order):
    errors = []
    for steps in (20, 40):
        sigmas = karras(steps)
        x, _, z = start(sigmas)
        errors.append((SAMPLERS[name](gaussian_denoiser, x, sigmas) - (M + S * z)).abs().max().item())
    assert errors[0] / errors[1] > 0.8 * 2**order


def test_ddim_eta0_is_euler_and_ddim_eta1_is_ddpm_beta_tilde():
    """Song et al. 2021: DDIM with eta = 0 is the probability-flow Euler step in sigma space;
    eta = 1 samples the DDPM posterior with variance beta-tilde. Same noise, same result."""
    sigmas = sampling_schedule(TrainingSchedule("linear"), 12, "leading").sigmas
    x, _, _ = start(sigmas)
    torch.testing.assert_close(SAMPLERS["ddim"](gaussian_denoiser, x, sigmas, eta=0.0),
                               SAMPLERS["euler"](gaussian_denoiser, x, sigmas), rtol=1e-10, atol=1e-10)
    runs = [SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), **opts)
            for name, opts in (("ddim", {"eta": 1.0}), ("ddpm", {"variance": "beta_tilde"}))]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-10)
    # and ddim's eta-noise is exactly the ancestral split of k-diffusion
    runs = [SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), eta=0.5)
            for name in ("ddim", "euler_ancestral")]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)


def test_ddpm_large_variance_differs_and_stays_in_distribution():
    sigmas = sampling_schedule(TrainingSchedule("linear"), 50, "leading").sigmas
    x, _, _ = start(sigmas)
    small = SAMPLERS["ddpm"](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    large = SAMPLERS["ddpm"](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1),
                             variance="beta")
    assert not torch.allclose(small, large)
    # beta over-disperses (Ho et al. section 3.2: it is optimal for x0 ~ N(0, I), not for s = 0.5)
    assert large.std().item() > small.std().item()
    assert abs(large.mean().item() - M) < 0.02


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_output_and_float32_matches_float64(name):
    sigmas = sampling_schedule(TrainingSchedule("scaled_linear"), 8, "leading").sigmas
    x64, _, _ = start(sigmas)
    x64 = x64[:64]

    def run(x):
        return SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(42))

    a, b = run(x64), run(x64)
    assert torch.equal(a, b)
    torch.testing.assert_close(run(x64.float()).double(), a, rtol=1e-5, atol=1e-5)


def test_generator_none_draws_fresh_noise():
    sigmas = sampling_schedule(TrainingSchedule("scaled_linear"), 5, "leading").sigmas
    x = torch.zeros(4, 1, 2, 2)
    a = SAMPLERS["euler_ancestral"](gaussian_denoiser, x, sigmas)
    b = SAMPLERS["euler_ancestral"](gaussian_denoiser, x, sigmas)
    assert not torch.equal(a, b)


def test_step_noise_is_drawn_from_the_cpu_generator_in_step_order():
    """The contract: noise is torch.randn(x.shape, generator=g) per step, nothing else drawn."""
    sigmas = sampling_schedule(TrainingSchedule("scaled_linear"), 4, "leading").sigmas
    x = torch.zeros(2, 1, 3, 3)

    def zero(x, sigma):
        return torch.zeros_like(x)

    out = SAMPLERS["euler_ancestral"](zero, x, sigmas, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected = x.clone()
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        down = s[i + 1] ** 2 / s[i]  # eta 1: sigma_down = sigma_next^2 / sigma
        up = math.sqrt(s[i + 1] ** 2 - down**2)
        expected = expected + (down - s[i]) * expected / s[i]
        if s[i + 1] > 0:
            expected = expected + up * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(out, expected)


def test_callback_sees_every_step():
    sigmas = sampling_schedule(TrainingSchedule("scaled_linear"), 6, "karras").sigmas
    seen = []
    SAMPLERS["heun"](gaussian_denoiser, torch.ones(1, 1, 2, 2), sigmas, callback=seen.append)
    assert [c["i"] for c in seen] == list(range(6))
    assert [c["sigma"] for c in seen] == pytest.approx([float(s) for s in sigmas[:-1]])
    assert set(seen[0]) == {"i", "sigma", "x", "denoised"}


@pytest.mark.parametrize("name", SAMPLERS)
def test_non_finite_latent_names_step_and_sigma(name):
    sigmas = sampling_schedule(TrainingSchedule("scaled_linear"), 6, "leading").sigmas

    def poisoned(x, sigma):
        out = gaussian_denoiser(x, sigma)
        return out * float("nan") if sigma <= float(sigmas[3]) else out

    step = 2 if name == "heun" else 3  # heun evaluates at sigma_next inside step 2
    with pytest.raises(NonFiniteError, match=rf"at step {step} \(sigma {float(sigmas[step]):.6g}\)"):
        SAMPLERS[name](poisoned, torch.ones(1, 1, 2, 2), sigmas, generator=torch.Generator().manual_seed(0))


def test_unknown_sampler_and_bad_options():
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'.*euler"):
        get_sampler("dpm_fast")
    sigmas = sampling_schedule(TrainingSchedule("linear"), 3, "leading").sigmas
    with pytest.raises(ValueError, match="variance"):
        SAMPLERS["ddpm"](gaussian_denoiser, torch.ones(1, 1, 1, 1), sigmas, variance="learned")
