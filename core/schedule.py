"""Noise schedules: betas -> alpha_bar -> sigma, and the sigmas a sampler visits.

Notation (Ho et al. 2020, section 2): t in {0..T-1}, beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, and q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (eq. 4).
Samplers work in the variance-exploding view of the same process (Karras et al. 2022):
x = x_0 + sigma * eps with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), i.e. x_ve = x_vp / sqrt(alpha_bar).

Names follow diffusers. ComfyUI's names clash: its "linear" is our `scaled_linear` (sqrt-space, the
Stable Diffusion schedule) and its "sqrt_linear" is our `linear` (the DDPM paper's schedule).
Everything here is computed in float64.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential")

# Default beta ranges per schedule: DDPM's linear 1e-4..0.02 and Stable Diffusion's 0.00085..0.012.
DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}

# With zero terminal SNR, alpha_bar_T = 0 and sigma_T is infinite. For sampling and for mapping sigma
# to t, alpha_bar_T is clamped to 2^-24 (sigma_max ~ 4096), as diffusers' Euler scheduler does;
# ComfyUI clamps to 4.8973e-08 instead (sigma_max ~ 4519). The variational bound uses the exact 0.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24

KARRAS_RHO = 7.0


def _check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


def make_betas(name, num_timesteps=1000, beta_start=None, beta_end=None):
    """beta_1..beta_T of a named training schedule (float64, length num_timesteps)."""
    _check_choice("beta_schedule", name, BETA_SCHEDULES)
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start/beta_end")
        return _cosine_betas(num_timesteps)
    start, end = DEFAULT_BETA_RANGE[name]
    start = start if beta_start is None else beta_start
    end = end if beta_end is None else beta_end
    if not 0 < start <= end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {start}..{end}")
    if name == "linear":  # DDPM section 4: linear from 1e-4 to 0.02
        return torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    # scaled_linear: linear in sqrt(beta), Stable Diffusion's schedule
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2);
    beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), capped at 0.999."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0
    while alpha_bar_1 is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing, clamped at both ends."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


@dataclass(frozen=True)
class SigmaTable:
    """A discrete training schedule known only by its sigmas [T], increasing (ComfyUI's
    model_sampling.sigmas): alpha_bar_t = 1 / (1 + sigma_t^2), the inverse of TrainingSchedule.sigmas.
    What the variational bound needs of a host's model."""

    sigmas: torch.Tensor

    @property
    def num_timesteps(self):
        return len(self.sigmas)

    @property
    def alpha_bar(self):
        return 1 / (1 + self.sigmas.double().cpu() ** 2)


@dataclass(frozen=True)
class TrainingSchedule:
    """The betas a model was trained with, and what follows from them.

    The fields are what checkpoint metadata stores (`config` / `from_config`); beta_start and
    beta_end default to the schedule's own range (None for cosine, which has none).
    """

    beta_schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = None
    beta_end: float = None
    zero_terminal_snr: bool = False

    def __post_init__(self):
        betas = make_betas(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end)
        if self.beta_schedule in DEFAULT_BETA_RANGE:
            object.__setattr__(self, "beta_start", float(betas[0]))
            object.__setattr__(self, "beta_end", float(betas[-1]))
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        object.__setattr__(self, "betas", betas)

    @classmethod
    def from_config(cls, config):
        """Inverse of `config`: the dict stored in checkpoint metadata."""
        return cls(**config)

    @property
    def config(self):
        return {"beta_schedule": self.beta_schedule, "num_timesteps": self.num_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end,
                "zero_terminal_snr": self.zero_terminal_snr}

    @property
    def alphas(self):
        return 1 - self.betas

    @property
    def alpha_bar(self):
        """alpha_bar_t = prod_{s<=t} (1 - beta_s), exact (0 at t = T with zero terminal SNR)."""
        return torch.cumprod(self.alphas, 0)

    @property
    def sigmas(self):
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t (alpha_bar_T = 0 clamped to 2^-24)."""
        alpha_bar = self.alpha_bar
        if self.zero_terminal_snr:
            alpha_bar[-1] = ZERO_SNR_ALPHA_BAR
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    @property
    def log_snr(self):
        """lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) = -2 log sigma_t (-inf at a zero terminal SNR)."""
        alpha_bar = self.alpha_bar
        return alpha_bar.log() - (1 - alpha_bar).log()

    @property
    def sigma_min(self):
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        """Continuous timestep of a sigma, by linear interpolation in log sigma, clamped to [0, T-1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = torch.arange(self.num_timesteps, dtype=torch.float64)
        return _interp(sigma.log(), self.sigmas.log(), t)

    def t_to_sigma(self, t):
        """sigma at a (possibly fractional) timestep, by linear interpolation in log sigma."""
        t = torch.as_tensor(t, dtype=torch.float64)
        grid = torch.arange(self.num_timesteps, dtype=torch.float64)
        return _interp(t, grid, self.sigmas.log()).exp()


@dataclass(frozen=True)
class SamplingSchedule:
    """The sigmas a sampler visits: descending, ending at 0 (ComfyUI's SIGMAS convention),
    with the matching (possibly fractional) timesteps, one per sigma before the final 0."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def alpha_bar(self):
        """alpha_bar = 1 / (1 + sigma^2) at each sigma (1 at the final sigma = 0)."""
        return 1 / (1 + self.sigmas**2)

    @property
    def log_snr(self):
        """lambda = log(alpha_bar / (1 - alpha_bar)) = -2 log sigma at each sigma (+inf at the final 0)."""
        return -2 * self.sigmas.log()


def sampling_schedule(training, steps, spacing="leading", steps_offset=1):
    """Pick `steps` noise levels of a training schedule.

    leading, trailing, linspace: timestep spacings of diffusers (Lin et al. 2023, Table 2);
    `steps_offset` shifts leading's timesteps (Stable Diffusion uses 1).
    karras: Karras et al. 2022, eq. 5 (rho = 7) between the training sigma_min and sigma_max.
    exponential: sigmas evenly spaced in log sigma over the same range.
    """
    _check_choice("spacing", spacing, SPACINGS)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    T = training.num_timesteps
    if spacing in ("karras", "exponential"):
        sigmas = (_karras_sigmas if spacing == "karras" else _exponential_sigmas)(
            training.sigma_min, training.sigma_max, steps)
        timesteps = training.sigma_to_t(sigmas)
    else:
        timesteps = _spaced_timesteps(spacing, T, steps, steps_offset)
        sigmas = training.t_to_sigma(timesteps)
    return SamplingSchedule(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps)


def _spaced_timesteps(spacing, T, steps, steps_offset):
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {T} training timesteps with {spacing} spacing")
    if spacing == "leading":  # (N-1)k, ..., k, 0 with k = T // N, plus the offset
        t = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps) + steps_offset
        if t[0] > T - 1:
            raise ValueError(f"steps_offset {steps_offset} pushes leading timesteps past {T - 1}")
        return t
    if spacing == "trailing":  # T-1, T-1-T/N, ..., rounded
        # numpy's arange does diffusers' exact arithmetic (ties at x.5 round alike); [:steps] drops the
        # extra element float error adds for some N (e.g. 61 at T = 1000)
        return torch.from_numpy(np.round(np.arange(T, 0, -T / steps))[:steps] - 1)
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64)  # linspace: fractional, not rounded


def _karras_sigmas(sigma_min, sigma_max, n, rho=KARRAS_RHO):
    """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def _exponential_sigmas(sigma_min, sigma_max, n):
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
