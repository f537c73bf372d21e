"""Zero-shot classification by the variational bound (Li et al. 2023, "Your Diffusion Model is Secretly a
Zero-Shot Classifier"): of candidate prompts c, the model's answer is the one under which the image costs
the fewest nats, argmin_c L(x0 | c), L the bound of core/likelihood.py conditioned on c.

Paired estimate. Every candidate is scored at the SAME K timesteps and the SAME noise (the paper's
Algorithm 1 draws one set of (t, eps) for all classes): the K (t, x_t) pairs and L_0's x_1 are drawn once,
exactly as variational_bound draws them for one image with timesteps=K (generator: the timesteps, then one
noise tensor per column, L_0's first), so candidate c's estimate IS likelihood(..., context_c, steps=K,
seed) and the noise cancels in the differences between candidates. Candidates x timesteps go through the
network together, batch_size pairs per call.

What is compared. The full conditional bound, L_T + (T - 1) mean_k L_{t_k - 1} + L_0: L_T does not depend
on c, so a difference of bounds is (T - 1) times the mean difference of the timestep terms plus the
difference of L_0, and each timestep term is the eps-error ||eps - eps_theta(x_t, t, c)||^2 weighted by the
bound's own lambda_t (DDPM eq. 12). The paper derives its classifier from this bound and then drops lambda_t
(uniform weights); here the bound itself is kept, so that the numbers are what `nll` and LDMLikelihood
report for each prompt (nats or bits per dimension, a difference being a log-likelihood ratio bound). On the
built-in shapes UNet the two rank alike: bench/classify.py, 48 scenes of an independent renderer, colour 24/24
with both, shape 22/24 by the bound and 23/24 by the uniform eps-error (one question apart).

Uncertainty. For candidate c and the best b, d_k = L_c(t_k) - L_b(t_k) are K i.i.d. draws (the timesteps
are drawn independently, each with its own noise), so the difference of the estimates has standard error
(T - 1) std(d) / sqrt(K), far below that of either bound since the noise is shared. Like the bound's own
standard error it does not cover L_0's single draw of x_1 (common to all candidates).
"""
import math
from dataclasses import dataclass

import torch

from .autoencoder import placement
from .errors import InputError
from .likelihood import (UNITS, _check_context, _check_schedule, _check_x0, bound_terms, noise_draws,
                         strided_timesteps, timesteps_per_call)
from .memory import available_memory, estimate_peak
from .objective import prior_kl, q_sample
from .pipeline import bound_data, counted_network, encode_text


@dataclass
class Classification:
    """Candidates scored by their bound on one image.

    bounds:          [C] each candidate's bound estimate in `unit` (lower: the image is more likely under it)
    standard_error:  [C] the standard error of bounds[c] - bounds[best] in `unit`, 0 for the best itself
    ranking:         candidate indices, best (lowest bound) first
    terms:           [C, K] L_{t-1} in nats at the shared timesteps, paired column by column
    decoder:         [C] L_0 in nats at the shared x_1
    timesteps:       [K] the shared array indices (the paper's t = i + 1)
    """

    bounds: torch.Tensor
    standard_error: torch.Tensor
    ranking: list
    terms: torch.Tensor
    decoder: torch.Tensor
    timesteps: torch.Tensor
    unit: str


@torch.no_grad()
def classify_bound(network, x0, contexts, schedule, timesteps, generator, prediction="eps", variance="beta_tilde",
                   discrete=True, batch_size=256):
    """Score one image x0 [1, C, H, W] under each of `contexts` [N, L, D] (one per candidate), at the same
    `timesteps` (K >= 2) random timesteps and noise for all (generator: a CPU torch.Generator). network,
    schedule, prediction, variance, discrete: as variational_bound. batch_size: (candidate, timestep) pairs
    per network call (at least one column of the N candidates). Returns a Classification (CPU, float64)."""
    alpha_bar = _check_schedule(schedule, prediction)
    _check_x0(x0, discrete, network)
    if x0.shape[0] != 1:
        raise ValueError(f"x0: classify one image at a time, got a batch of {x0.shape[0]}")
    n = contexts.shape[0]
    if n < 2:
        raise ValueError(f"contexts: classification needs at least 2 candidates, got {n}")
    contexts = _check_context(contexts, n)
    T = len(alpha_bar)
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or not 2 <= timesteps <= T - 1:
        raise ValueError(f"timesteps: an integer K with 2 <= K <= T - 1 = {T - 1}, got {timesteps!r}")

    work = torch.float32 if x0.device.type == "mps" else torch.float64
    index = strided_timesteps(1, T, timesteps, generator)[0]
    evaluated = torch.cat([index.new_zeros(1), index])  # L_0 first, as variational_bound
    eps = noise_draws(x0.shape, len(evaluated), generator, work)[:, 0]
    x_t = q_sample(x0.to(work).expand(len(evaluated), *x0.shape[1:]), alpha_bar.to(work)[evaluated],
                   eps).to(x0.device)
    values = torch.empty(n, len(evaluated), dtype=torch.float64)
    per_call = timesteps_per_call(n, batch_size)
    for start in range(0, len(evaluated), per_call):
        columns = slice(start, start + per_call)
        k = len(evaluated[columns])
        i = evaluated[columns].repeat(n)  # candidate-major: row c * k + j
        xs = x_t[columns].repeat(n, *([1] * (x0.ndim - 1)))
        ctx = contexts.repeat_interleave(k, 0)
        terms = bound_terms(network, x0.expand(n * k, *x0.shape[1:]), xs, i.to(x0.device), schedule, prediction,
                            ctx, variance, discrete)
        values[:, columns] = terms.reshape(n, k).double().cpu()

    decoder, terms = values[:, 0], values[:, 1:]
    nats = prior_kl(x0.detach().double(), schedule).cpu() + (T - 1) * terms.mean(1) + decoder
    per_unit = x0[0].numel() * (math.log(2) if discrete else 1.0)
    return _ranked(nats, terms, decoder, index, T, per_unit, UNITS[bool(discrete)])


def _ranked(nats, terms, decoder, index, T, per_unit, unit):
    """The Classification of candidates' bounds in nats [C], from their paired terms [C, K]."""
    ranking = sorted(range(len(nats)), key=lambda c: float(nats[c]))
    differences = terms - terms[ranking[0]]
    standard_error = differences.std(1) * (T - 1) / math.sqrt(terms.shape[1])
    return Classification(bounds=nats / per_unit, standard_error=standard_error / per_unit, ranking=ranking,
                          terms=terms, decoder=decoder, timesteps=index, unit=unit)


def paired_classification(bounds, T):
    """The Classification of one image from each candidate's VariationalBound of it, estimated with the same
    K >= 2 strided timesteps and noise (one seed for all: likelihood or denoiser_likelihood draw them before
    any network call, so they are shared): what classify_bound computes in one batch, candidate by candidate."""
    if len(bounds) < 2:
        raise ValueError(f"bounds: classification needs at least 2 candidates, got {len(bounds)}")
    if any(b.standard_error is None or len(b.nats) != 1 for b in bounds):
        raise ValueError("bounds: each must be a strided estimate (steps K >= 2) of one image")
    if any(not torch.equal(b.timesteps, bounds[0].timesteps) for b in bounds):
        raise ValueError("bounds: the candidates were drawn at different timesteps (another seed or steps)")
    first = bounds[0]
    return _ranked(torch.cat([b.nats for b in bounds]), torch.cat([b.terms for b in bounds]),
                   torch.cat([b.decoder for b in bounds]), first.timesteps[0], T,
                   first.dims * (math.log(2) if first.unit == UNITS[True] else 1.0), first.unit)


DEFAULT_STEPS = 100  # timesteps per image, shared by its candidates


def check_candidates(prompts, name="prompts"):
    """Refuse, naming `name` (the node's input, the command line's flag or batch line), candidates that
    cannot be ranked: fewer than 2, or one prompt given twice (its two scores would tie by construction)."""
    if len(prompts) < 2:
        raise InputError(name, f"needs at least 2 candidate prompts, got {len(prompts)}")
    if len(set(prompts)) < len(prompts):
        raise InputError(name, "the same prompt is given twice")


def encode_candidates(text_encoder, prompts):
    """The contexts [N, L, D] of N candidate prompts (a pipeline.TextEncoder), refusing what cannot be
    compared: check_candidates, or prompts of different lengths in 77-token chunks (they cannot share a batch)."""
    check_candidates(prompts)
    contexts = [encode_text(text_encoder, text).context for text in prompts]
    if len({c.shape[1] for c in contexts}) > 1:
        raise InputError("prompts", "the candidates encode to different numbers of 77-token chunks "
                                    f"({', '.join(str(c.shape[1] // 77) for c in contexts)}): keep every prompt "
                                    "under 75 tokens, or all of them over")
    return torch.cat(contexts)


def pairs_per_call(network, shape, context_tokens, most=256):
    """How many (candidate, timestep) pairs one network call takes: `most`, halved until core/memory.py's
    estimate of the call's peak (its "sample" stage runs 2 x the batch it is given) fits in half the memory
    available on the network's device."""
    available, _ = available_memory(placement(network)[0])
    batch = most
    while batch > 1 and available is not None and estimate_peak(
            "sample", network, (math.ceil(batch / 2), *shape[1:]), context_tokens=context_tokens) > available / 2:
        batch //= 2
    return batch


def classify(model, vae, image, contexts, steps=DEFAULT_STEPS, seed=0, variance="beta_tilde", progress=None):
    """Classify IMAGE [1, H, W, 3] in 0..1 among the prompts encoded in `contexts` [N, L, D] under a
    DiffusionModel (pixel or latent; the data is core/pipeline.bound_data's). steps: K shared timesteps
    (2..T-1); seed: the timestep and noise draws, as likelihood(..., steps=K, seed=seed) draws them.
    progress(done, total) per network call. Returns a Classification."""
    T = getattr(model.schedule, "num_timesteps", None)
    if T is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= T - 1):
        raise ValueError(f"steps: 2..{T - 1} shared timesteps, got {steps!r}")
    x0 = bound_data(model, vae, image)
    if len(x0) != 1:
        raise InputError("image", f"a batch of {len(x0)}: classification takes one image at a time")
    device, _ = placement(model.network)
    batch = pairs_per_call(model.network, x0.shape, contexts.shape[1])
    network = counted_network(model, steps + 1, len(contexts), batch, progress)
    with torch.inference_mode():
        return classify_bound(network, x0.float().to(device), contexts.to(device), model.schedule, steps,
                              torch.Generator("cpu").manual_seed(seed), model.prediction, variance,
                              discrete=model.pixel_space, batch_size=batch)
