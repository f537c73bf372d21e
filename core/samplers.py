"""Samplers: one short function per update rule, all with k-diffusion's signature (contract)

    SAMPLERS[name](denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x

`denoiser(x, sigma) -> x0_hat` works on x = x0 + sigma * eps (the variance-exploding view, see
schedule.py); `sigmas` is descending and ends at 0; x starts at noise level sigmas[0].
t-space rules (DDPM, DDIM) read alpha_bar = 1 / (1 + sigma^2) off each sigma, so every sampler
runs on any sampling schedule.

Randomness (contract): step noise is drawn in step order from the CPU `generator` with
torch.randn(x.shape, generator=generator), then moved to x's device and dtype, so a seed gives the
same result on CPU and GPU. generator=None means a fresh unseeded CPU generator.
`callback` receives {"i", "sigma", "x", "denoised"} after each step. NaN or inf in x raises
NonFiniteError naming the step and sigma.
"""
import math

import torch

from .objective import VARIANCES


class NonFiniteError(FloatingPointError):
    """The sampled latent became NaN or inf."""


class _Monitor:
    """After each step: the finite check and the callback.

    On the CPU the check runs at once. On other devices it is queued as a device-side flag and
    read only at a callback or at the end, so it never forces a host sync per step.
    """

    def __init__(self, sigmas, callback):
        self.sigmas, self.callback, self.pending = sigmas, callback, []

    def __call__(self, i, x, denoised):
        self.pending.append((i, torch.isfinite(x).all()))
        if x.device.type == "cpu" or self.callback is not None:
            self._check()
        if self.callback is not None:
            self.callback({"i": i, "sigma": self.sigmas[i], "x": x, "denoised": denoised})

    def _check(self):
        if not self.pending:
            return
        steps, flags = zip(*self.pending)
        self.pending = []
        ok = torch.stack(flags).cpu()
        if not ok.all():
            i = steps[int((~ok).nonzero()[0])]
            raise NonFiniteError(f"the latent became NaN or inf at step {i} (sigma {self.sigmas[i]:.6g}): "
                                 "try fp32, a lower cfg, or another sampler")

    def finish(self, x):
        self._check()
        return x


def _generator(generator):
    if generator is None:
        generator = torch.Generator("cpu")
        generator.seed()
    return generator


def _noise(x, generator):
    """Step noise from the CPU generator, on x's device and dtype. For CUDA it is drawn into pinned
    memory and copied without blocking the host (torch's pinned allocator keeps the block until the
    copy has run), so a stochastic sampler needs no host sync per step."""
    if x.device.type != "cuda":
        return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    noise = torch.randn(x.shape, generator=generator, out=torch.empty(x.shape, pin_memory=True))
    return noise.to(x.device, non_blocking=True).to(x.dtype)


def _setup(sigmas, callback, generator=None):
    sigmas = [float(s) for s in sigmas]
    return sigmas, _Monitor(sigmas, callback), _generator(generator)


def _alpha_bar(sigma):
    return 1.0 / (1.0 + sigma * sigma)


# --- t-space rules ---------------------------------------------------------------------------

def ddpm(denoiser, x, sigmas, *, generator=None, callback=None, variance="beta_tilde", eta=1.0):
    """Ho et al. 2020, Algorithm 2, in the strided form for any pair of noise levels t > s:
    beta = 1 - alpha_bar_t / alpha_bar_s, then x_s ~ q(x_s | x_t, x0_hat) (eq. 6-7) with the fixed
    variance beta-tilde (`variance="beta_tilde"`) or beta (`"beta"`), times eta. No noise at the last step."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown ddpm variance {variance!r}; choose {' or '.join(VARIANCES)}")
    sigmas, done, generator = _setup(sigmas, callback, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = _ddpm_step(x, denoised, sigmas[i], sigmas[i + 1], variance, eta, generator)
        done(i, x, denoised)
    return done.finish(x)


def _ddpm_step(x, x0, sigma, sigma_next, variance, eta, generator):
    ab_t, ab_s = _alpha_bar(sigma), _alpha_bar(sigma_next)
    alpha = ab_t / ab_s
    beta = 1 - alpha
    x_t = x * math.sqrt(ab_t)  # to the variance-preserving scale of eq. 4
    # eq. 7: posterior mean of q(x_s | x_t, x_0)
    mean = (math.sqrt(ab_s) * beta / (1 - ab_t)) * x0 + (math.sqrt(alpha) * (1 - ab_s) / (1 - ab_t)) * x_t
    var = beta * (1 - ab_s) / (1 - ab_t) if variance == "beta_tilde" else beta
    if sigma_next > 0 and eta > 0:
        mean = mean + eta * math.sqrt(var) * _noise(x, generator)
    return mean / math.sqrt(ab_s)


def ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta=0.0):
    """Song et al. 2021, eq. 12: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - s^2) eps_hat + s z, with
    s = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s) (eq. 16). eta = 0 is deterministic;
    eta = 1 is DDPM with variance beta-tilde."""
    sigmas, done, generator = _setup(sigmas, callback, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = _ddim_step(x, denoised, sigmas[i], sigmas[i + 1], eta, generator)
        done(i, x, denoised)
    return done.finish(x)


def _ddim_step(x, x0, sigma, sigma_next, eta, generator):
    ab_t, ab_s = _alpha_bar(sigma), _alpha_bar(sigma_next)
    eps = (x - x0) / sigma
    s = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - s * s, 0.0)) * eps
    if s > 0:
        x_s = x_s + s * _noise(x, generator)
    return x_s / math.sqrt(ab_s)


def plms(denoiser, x, sigmas, *, generator=None, callback=None):
    """Liu et al. 2022 (PNDM), pseudo linear multistep: Adams-Bashforth combinations of the last
    eps estimates (eq. 12), each applied through the DDIM transfer, which in sigma space is
    x_s = x + (sigma_s - sigma_t) eps. The first step is the pseudo improved Euler step."""
    sigmas, done, _ = _setup(sigmas, callback, generator)
    old_eps = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = (x - denoiser(x, sigma)) / sigma
        if not old_eps and sigma_next > 0:  # second-order start: average with the slope at the end
            x_euler = x + (sigma_next - sigma) * eps
            eps_prime = (eps + (x_euler - denoiser(x_euler, sigma_next)) / sigma_next) / 2
        else:
            eps_prime = _adams_bashforth([*old_eps[-3:], eps])
        old_eps.append(eps)
        x, denoised = x + (sigma_next - sigma) * eps_prime, x - sigma * eps_prime
        done(i, x, denoised)
    return done.finish(x)


def _adams_bashforth(eps):
    """Adams-Bashforth combination of the newest len(eps) estimates (oldest first), orders 1 to 4."""
    coefficients = {1: (1,), 2: (-1, 3), 3: (5, -16, 23), 4: (-9, 37, -59, 55)}[len(eps)]
    scale = {1: 1, 2: 2, 3: 12, 4: 24}[len(eps)]
    return sum(c * e for c, e in zip(coefficients, eps)) / scale


# --- sigma-space rules (Karras et al. 2022; k-diffusion) --------------------------------------

def euler(denoiser, x, sigmas, *, generator=None, callback=None):
    """Karras et al. 2022, Algorithm 1 without churn: x += (sigma_next - sigma) d, d = (x - D) / sigma."""
    sigmas, done, _ = _setup(sigmas, callback, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
        done(i, x, denoised)
    return done.finish(x)


def heun(denoiser, x, sigmas, *, generator=None, callback=None):
    """Karras et al. 2022, Algorithm 1 (churn 0): an Euler step corrected by the slope at its end,
    plain Euler into sigma = 0."""
    sigmas, done, _ = _setup(sigmas, callback, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        done(i, x, denoised)
    return done.finish(x)


def euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0):
    """Ancestral Euler (k-diffusion): step deterministically down to sigma_down, then add fresh noise
    of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2."""
    sigmas, done, generator = _setup(sigmas, callback, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * (x - denoised) / sigma
        if sigma_next > 0:
            x = x + sigma_up * _noise(x, generator)
        done(i, x, denoised)
    return done.finish(x)


def _ancestral_split(sigma, sigma_next, eta):
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, in lambda = -log sigma: a second-order
    multistep update from the last two denoised estimates; first order at the first and last step."""
    sigmas, done, _ = _setup(sigmas, callback, generator)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            d = denoised
            if old_denoised is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised = denoised
        done(i, x, denoised)
    return done.finish(x)


def dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0):
    """SDE variant of DPM-Solver++(2M) (Lu et al. 2022, section 5; k-diffusion's midpoint form),
    with fresh Gaussian noise each step; eta = 0 gives the ODE solver."""
    sigmas, done, generator = _setup(sigmas, callback, generator)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_last) * (denoised - old_denoised)
            if eta > 0:
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * _noise(x, generator)
            h_last = h
        old_denoised = denoised
        done(i, x, denoised)
    return done.finish(x)


SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "plms": plms,
}


def get_sampler(name):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None
