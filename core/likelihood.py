"""The variational bound of one image (or latent) under a trained DDPM (Ho et al. 2020, eq. 5).

    -log p(x0) <= L = L_T + sum_{t=2..T} L_{t-1} + L_0

with the terms of core/objective.py (array index i is the paper's t = i + 1):
    L_T     = KL(q(x_T | x0) || N(0, I))                               prior_kl, no parameters
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || N(mu_theta(x_t, t), sigma_t^2))  reverse_kl, t = 2..T, at one x_t each
    L_0     = -log p(x0 | x_1), p = N(x0_hat(x_1, 1), sigma_1^2)          decoder, at one x_1 ~ q(x_1 | x0)
sigma_t^2 is beta_tilde_t or beta_t (section 3.2); sigma_1^2 = beta_tilde_2 for both (model_variance). At t = 1
the model mean mu_theta(x_1, 1) = mu_tilde(x_1, x0_hat) is x0_hat itself (alpha_bar_0 = 1).

Units. discrete=True: x0 holds 8-bit pixels k / 255 * 2 - 1 and L_0 is the discretised Gaussian of section 3.3
(bins of width 2/255, the edge bins open at -1 and 1), so L is a code length: total = nats / (D ln 2) in
"bits/dim", D = C H W values per image. discrete=False (latents): L_0 is the Gaussian density, L bounds a
differential entropy, total = nats / D in "nats/dim (latent)" and can be negative; it is not comparable with
bits/dim of pixels. For a latent diffusion model the data is the scaled latent of the autoencoder's posterior
mean (scale_factor * encode(image).mode()): the space the denoiser models (ARCHITECTURE.md section 5).

Timesteps. timesteps=None evaluates every t = 2..T (one noise draw each); the estimate is exact in t and its
only randomness is the T noise draws. timesteps=K draws, for each image separately, K of t = 2..T independently
and uniformly (with replacement), each with its own x_t, and estimates sum_t L_{t-1} by (T - 1) * the mean of
the K terms (SD_REFERENCE 5.6). standard_error = sample std of the K terms * (T - 1) / sqrt(K): per image, it
covers both the choice of timesteps and their noise draws (the K (t, x_t) pairs are i.i.d.), around the
expectation over both given x0. It does not cover the single draw of x_1 in L_0 (the full estimate has that
too); L_T has no noise. Images draw independently, so the mean over B images has standard error
sqrt(mean(standard_error^2) / B) from the estimate, on top of the spread of the images themselves.

Zero terminal SNR (alpha_bar_T = 0): q(x_T | x0) = N(0, I) exactly, so L_T = 0, and the t = T term becomes
KL(q(x_{T-1} | x0) || p(x_{T-1} | x_T)) where x_T holds no information about x0: the whole cost of starting
from pure noise moves into that term. It stays finite for v prediction (x0_hat = -v there) and x0 prediction;
eps prediction cannot give x0 at t = T (x0 = (x_T - eps) / 0) and is refused.
"""
import math
from dataclasses import dataclass

import torch

from .denoiser import PREDICTIONS
from .objective import (VARIANCES, discretized_decoder_nll, gaussian_decoder_nll, model_variance, prior_kl,
                        q_sample, reverse_kl)
from .schedule import SigmaTable

UNITS = {True: "bits/dim", False: "nats/dim (latent)"}


@dataclass
class VariationalBound:
    """The bound of each image in a batch of B.

    total:          [B] the bound in `unit`: bits/dim (8-bit pixels) or nats/dim (latents)
    nats:           [B] the bound in nats per image: prior + sum of terms (or (T-1) * mean, strided) + decoder
    terms:          [B, K] L_{t-1} in nats per image at each evaluated timestep
    timesteps:      [B, K] array indices i of those terms (the network's t; the paper's t = i + 1), all >= 1;
                    every image gets its own draw in a strided estimate
    prior:          [B] L_T in nats per image
    decoder:        [B] L_0 in nats per image
    standard_error: [B] in `unit` for a strided estimate (see the module docstring), None for all timesteps
    """

    total: torch.Tensor
    unit: str
    nats: torch.Tensor
    terms: torch.Tensor
    timesteps: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    standard_error: torch.Tensor | None
    dims: int


def predicted_x0(out, x_t, alpha_bar, prediction):
    """x0 from a network output in the variance-preserving scale, alpha_bar [N] per sample:
    eps: (x_t - sqrt(1 - ab) eps) / sqrt(ab); v: sqrt(ab) x_t - sqrt(1 - ab) v; x0: the output."""
    if prediction == "x0":
        return out
    ab = alpha_bar.to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    if prediction == "eps":
        return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * out


def x0_network(denoise, schedule):
    """network(x_t, t, context) -> x0_hat for the bound (prediction "x0"), from a k-diffusion denoiser
    denoise(x, sigma) -> x0 in the variance-exploding scale (ComfyUI's MODEL, whatever it predicts inside):
    x = x_t / sqrt(alpha_bar_t) at sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (core/schedule.py), the
    same point of the forward process. `context` is not passed on: such a denoiser holds its conditioning."""
    alpha_bar = schedule.alpha_bar

    def network(x_t, t, context=None):
        ab = alpha_bar[t.long().cpu()]
        sigma = ((1 - ab) / ab).sqrt()
        x = x_t / ab.sqrt().to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return denoise(x, sigma.to(x_t.device, torch.float32))

    return network


def bound_terms(network, x0, x_t, i, schedule, prediction="eps", context=None, variance="beta_tilde",
                discrete=True, clip_x0=False):
    """The bound's timestep terms at given (x0, x_t) pairs, in one network call, per pair in nats:
    L_0 where i == 0 (x_t is then x_1) and L_{t-1} with t = i + 1 elsewhere.

    x0, x_t: [N, ...]; i: [N] array indices; context: [N, L, D] or None. network(x_t, t, context) sees x_t in
    x0's dtype and float32 timesteps t = i, as in training (objective.l_simple). clip_x0 clips the predicted x0
    to [-1, 1] (what pixel DDPM does; a different model, still a valid bound). The terms are computed in
    float64 (float32 on MPS).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: unknown {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    work = torch.float32 if x0.device.type == "mps" else torch.float64
    i = torch.as_tensor(i, device=x0.device).long()
    alpha_bar = schedule.alpha_bar.to(x0.device, work)[i]
    out = network(x_t.to(x0.dtype), i.to(torch.float32), context)
    x0w, x_tw = x0.to(work), x_t.to(work)
    x0_hat = predicted_x0(out.to(work), x_tw, alpha_bar, prediction)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    values = x0w.new_empty(len(i))
    first, rest = i == 0, i > 0
    if first.any():  # mu_theta(x_1, 1) = x0_hat; sigma_1^2 = beta_tilde_2
        var = model_variance(i[first], schedule, variance, x0w[first])
        decoder = discretized_decoder_nll if discrete else gaussian_decoder_nll
        values[first] = decoder(x0w[first], x0_hat[first], var.expand_as(x0w[first]))
    if rest.any():
        values[rest] = reverse_kl(x0w[rest], x_tw[rest], x0_hat[rest], i[rest], schedule, variance)
    return values


@torch.no_grad()
def variational_bound(network, x0, schedule, prediction="eps", context=None, variance="beta_tilde",
                      discrete=True, timesteps=None, generator=None, batch_size=64, clip_x0=False):
    """The variational bound of each image of x0 [B, C, H, W] (see the module docstring).

    network(x_t, t, context) -> eps / v / x0 (`prediction`) in the variance-preserving scale, with float32
    timesteps t in 0..T-1; context: [1 or B, L, D] or None. schedule: anything with `alpha_bar` (a float64
    tensor [T], exact: 0 at T with zero terminal SNR), e.g. the model's TrainingSchedule. discrete: 8-bit
    pixel data in [-1, 1] (bits/dim) or continuous latents (nats/dim). timesteps: None for all of t = 2..T,
    or K (2..T-1) for the strided estimate with its standard error. generator: a CPU torch.Generator for the
    timestep and noise draws (the timesteps first, then one noise tensor shaped like x0 per column of evaluated
    timesteps, L_0's x_1 first); results do not depend on batch_size. batch_size: (image, timestep) pairs per
    network call, at least one timestep of the whole batch (several timesteps are stacked into one call).
    Returns a VariationalBound on the CPU, in float64.
    """
    alpha_bar = _check_schedule(schedule, prediction)
    if variance not in VARIANCES:
        raise ValueError(f"variance: unknown {variance!r}; choose one of: {', '.join(VARIANCES)}")
    _check_x0(x0, discrete, network)
    b = x0.shape[0]
    context = _check_context(context, b)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    T = len(alpha_bar)
    if timesteps is None:
        index = torch.arange(1, T).expand(b, T - 1)
    else:
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or not 2 <= timesteps <= T - 1:
            raise ValueError(f"timesteps: the strided estimate needs an integer K with 2 <= K <= T - 1 = {T - 1} "
                             f"(K = 1 has no standard error), got {timesteps!r}; None evaluates all timesteps")
        index = strided_timesteps(b, T, timesteps, generator)
    evaluated = torch.cat([index.new_zeros(b, 1), index], 1)  # L_0 first

    work = torch.float32 if x0.device.type == "mps" else torch.float64
    values = torch.empty(evaluated.shape[1], b, dtype=torch.float64)
    per_call = timesteps_per_call(b, batch_size)
    for start in range(0, evaluated.shape[1], per_call):
        chunk = evaluated[:, start:start + per_call]
        n = chunk.shape[1]
        # one draw per column of timesteps, so the stream does not depend on how they are chunked
        eps = noise_draws(x0.shape, n, generator, work)
        xs = x0.unsqueeze(0).expand(n, *x0.shape).reshape(n * b, *x0.shape[1:])
        i = chunk.T.flatten()  # row j * b + image, as xs and eps
        x_t = q_sample(xs.to(work), alpha_bar.to(work)[i].to(x0.device), eps.to(x0.device).flatten(0, 1))
        ctx = None if context is None else context.repeat(n, *([1] * (context.ndim - 1)))
        terms = bound_terms(network, xs, x_t, i.to(x0.device), schedule, prediction, ctx, variance, discrete,
                            clip_x0)
        values[start:start + n] = terms.reshape(n, b).double().cpu()

    decoder, terms = values[0], values[1:].T.contiguous()
    prior = prior_kl(x0.detach().double(), schedule).cpu()
    if timesteps is None:
        nats = prior + terms.sum(1) + decoder
        standard_error = None
    else:
        nats = prior + (T - 1) * terms.mean(1) + decoder
        standard_error = terms.std(1) * (T - 1) / math.sqrt(timesteps)
    dims = x0[0].numel()
    per_unit = dims * math.log(2) if discrete else dims
    return VariationalBound(total=nats / per_unit, unit=UNITS[bool(discrete)], nats=nats, terms=terms,
                            timesteps=index.contiguous(), prior=prior, decoder=decoder,
                            standard_error=None if standard_error is None else standard_error / per_unit,
                            dims=dims)


def timesteps_per_call(rows, batch_size):
    """Columns of evaluated timesteps one network call takes for `rows` images (or candidates) at batch_size
    (row, timestep) pairs per call: at least one."""
    return max(1, batch_size // rows)


def counted(network, columns, rows, batch_size, progress=None):
    """network(x, t, context) that reports progress(done, calls) after each call, `calls` being how many the
    bound makes for `columns` evaluated timesteps (L_0's included) of `rows` rows at batch_size."""
    calls = math.ceil(columns / timesteps_per_call(rows, batch_size))
    done = [0]

    def call(x, t, context):
        out = network(x, t, context)
        done[0] += 1
        if progress:
            progress(done[0], calls)
        return out

    return call


def strided_timesteps(b, T, K, generator):
    """K of t = 2..T for each of b images, drawn independently and uniformly: array indices [b, K] in 1..T-1."""
    return torch.randint(1, T, (b, K), generator=generator)


def noise_draws(shape, n, generator, dtype):
    """n noise tensors shaped like x0 [n, *shape], drawn one after the other (one per column of timesteps)."""
    return torch.stack([torch.randn(shape, generator=generator, dtype=dtype) for _ in range(n)])


def _check_schedule(schedule, prediction):
    alpha_bar = getattr(schedule, "alpha_bar", None)
    if not torch.is_tensor(alpha_bar):
        raise ValueError("schedule: the model has no known training schedule; the bound needs the alpha_bar of "
                         "the schedule it was trained with (its TrainingSchedule)")
    alpha_bar = alpha_bar.double().cpu()
    T = getattr(schedule, "num_timesteps", len(alpha_bar))
    if alpha_bar.ndim != 1 or len(alpha_bar) < 2 or T != len(alpha_bar):
        raise ValueError(f"schedule: alpha_bar must be one value per timestep (T >= 2), got shape "
                         f"{list(alpha_bar.shape)} for num_timesteps {T}")
    if (not torch.isfinite(alpha_bar).all() or not alpha_bar[0] < 1 or (alpha_bar[:-1] <= 0).any()
            or alpha_bar[-1] < 0 or (alpha_bar[1:] >= alpha_bar[:-1]).any()):
        raise ValueError("schedule: alpha_bar must decrease strictly from below 1, positive before t = T "
                         "(0 allowed at t = T)")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: unknown {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    if alpha_bar[-1] == 0 and prediction == "eps":
        raise ValueError("schedule: alpha_bar_T = 0 (zero terminal SNR), where eps prediction cannot give x0 "
                         "(x0 = (x_T - eps) / 0); the bound needs a v- or x0-prediction model")
    return alpha_bar


def _check_x0(x0, discrete, network):
    if not torch.is_tensor(x0) or x0.ndim != 4 or not x0.is_floating_point():
        shape = list(x0.shape) if torch.is_tensor(x0) else type(x0).__name__
        raise ValueError(f"x0: expected a float tensor [batch, channels, height, width], got {shape}")
    channels = getattr(getattr(network, "config", None), "in_channels", None)
    if isinstance(channels, int) and x0.shape[1] != channels:
        raise ValueError(f"x0: has {x0.shape[1]} channels, the network takes {channels}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0: holds NaN or inf")
    if discrete:
        k = (x0.double() + 1) * 127.5
        if k.min() < -1e-3 or k.max() > 255 + 1e-3 or (k - k.round()).abs().max() > 1e-3:
            raise ValueError("x0: discrete=True needs 8-bit pixels k / 255 * 2 - 1 in [-1, 1]; these values are "
                             "off that grid (pass discrete=False for continuous data such as latents)")


def _check_context(context, b):
    if context is None:
        return None
    if context.shape[0] not in (1, b):
        raise ValueError(f"context: batch {context.shape[0]} matches neither 1 nor x0's batch {b}")
    return context.expand(b, *context.shape[1:])


def check_bound_steps(steps, T, name="steps"):
    """The bound's timesteps: 0 for all T, or K (2..T-1) strided with a standard error; ValueError naming
    `name` otherwise (the node's input, or the command line's flag)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == 0 or 2 <= steps <= T - 1):
        raise ValueError(f"{name}: 0 (all {T} timesteps) or a strided estimate of 2..{T - 1}, got {steps!r}")


def denoiser_likelihood(denoise, x0, sigmas, variance="beta_tilde", steps=0, seed=0, progress=None, batch=64):
    """The variational bound of latents x0 [B, C, h, w] (the denoiser's own, scaled, space) under a k-diffusion
    denoiser denoise(x, sigma) -> x0 trained on the discrete sigmas [T] (increasing): a host's model, such as
    ComfyUI's MODEL, whose prediction type (eps, v) stays inside it. The same draws as likelihood() for the
    same seed and steps, so the pack's own model wrapped this way gives the same numbers (nats/dim)."""
    schedule = SigmaTable(sigmas)
    T = schedule.num_timesteps
    check_bound_steps(steps, T)
    network = counted(x0_network(denoise, schedule), T if steps == 0 else steps + 1, len(x0), batch, progress)
    with torch.inference_mode():
        return variational_bound(network, x0.float(), schedule, "x0", None, variance, discrete=False,
                                 timesteps=steps or None, generator=torch.Generator("cpu").manual_seed(seed),
                                 batch_size=batch)
