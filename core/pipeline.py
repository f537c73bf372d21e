"""Text-to-image and image-to-image with a loaded checkpoint: the steps the nodes expose, as functions.

Latents outside this module are the autoencoder's *unscaled* latents (ComfyUI's LATENT convention);
`sample` multiplies by the model's scale factor on the way in and divides on the way out, so the
denoiser, the samplers and SIGMAS all work on scaled latents and mean what ComfyUI's mean.
"""
import inspect
import math
import os
import sys
from dataclasses import dataclass

import torch

from .accel import cpu_layout, fast_network, gpu_layout, run_fp32
from .autoencoder import TILE_ABOVE, IdentityAutoencoder, placement
from .denoiser import Denoiser
from .errors import InputError
from .eta import call_seconds
from .inpaint import (ConcatInputs, MaskedDenoiser, concat_inputs, grow_mask, keep_outside, latent_mask, masked_pixels,
                      repeat_to_batch)
from .likelihood import check_bound_steps, counted, variational_bound
from .samplers import NonFiniteError, get_sampler
from .schedule import BETA_SCHEDULES, SPACINGS, TrainingSchedule, sampling_schedule
from .text import CLIPTokenizer, encode_prompt


@dataclass
class DiffusionModel:
    """The denoising network and what sampling needs to know about it."""

    network: torch.nn.Module  # UNetModel or TransformerModel: eps_theta(x, t, context)
    schedule: TrainingSchedule
    prediction: str
    scale_factor: float
    latent_channels: int
    pixel_space: bool = False  # the identity autoencoder: x0 is the image itself, in [-1, 1]
    resolution: int = None  # the image size it was trained on, when its file says
    empty_context: torch.Tensor = None  # the empty prompt's encoding: the likelihood's default condition
    name: str = None  # the file it came from, for messages
    factor: int = None  # the autoencoder's downsampling factor f (1 in pixel space), when known
    compile: bool = False  # sample on the CPU from packages compiled ahead of time (core/compiled.py)

    @property
    def in_channels(self):
        """The channels the network reads: more than the latent's for an inpainting model."""
        return getattr(getattr(self.network, "config", None), "in_channels", self.latent_channels)

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The denoiser of a loaded checkpoint with its schedule, prediction and its autoencoder's latent scale."""
        vae = checkpoint.vae.config
        with torch.inference_mode():
            empty = encode_prompt(CLIPTokenizer(), checkpoint.text_encoder, "")
        return cls(checkpoint.denoiser, checkpoint.schedule, checkpoint.prediction, vae.scale_factor, vae.embed_dim,
                   isinstance(checkpoint.vae, IdentityAutoencoder), checkpoint.resolution, empty,
                   os.path.basename(checkpoint.path), vae.f)


@dataclass
class TextEncoder:
    model: torch.nn.Module
    tokenizer: CLIPTokenizer


@dataclass
class Conditioning:
    """An encoded prompt: context [1, 77 k, width] and the text it came from."""

    context: torch.Tensor
    text: str


@dataclass(frozen=True)
class ScheduleSpec:
    """A sampling schedule as chosen on LDMNoiseSchedule; `model` means the model's own betas."""

    BETA_SCHEDULE_OPTIONS = ("model", *BETA_SCHEDULES)  # the node's and the route's choices

    beta_schedule: str
    steps: int
    spacing: str
    zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.beta_schedule not in self.BETA_SCHEDULE_OPTIONS:
            raise ValueError(f"beta_schedule: unknown {self.beta_schedule!r}; choose model or one of {', '.join(BETA_SCHEDULES)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing: unknown {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {self.steps!r}")

    def training(self, model_schedule):
        """The betas the sigmas are drawn from: the model's own, or a named schedule over as many timesteps."""
        if self.beta_schedule == "model":
            if model_schedule is None:
                raise ValueError("beta_schedule: 'model' needs the model input linked")
            return TrainingSchedule(**{**model_schedule.config,
                                       "zero_terminal_snr": model_schedule.zero_terminal_snr or self.zero_terminal_snr})
        T = model_schedule.num_timesteps if model_schedule is not None else 1000
        return TrainingSchedule(self.beta_schedule, T, zero_terminal_snr=self.zero_terminal_snr)

    def sigmas(self, model_schedule, steps=None):
        """Descending sigmas ending at 0 for `steps` steps (default: the chosen number)."""
        return sampling_schedule(self.training(model_schedule), steps or self.steps, self.spacing).sigmas


def encode_text(text_encoder, text):
    """The prompt's context, ComfyUI-style: 77-token chunks concatenated, (text:w) weighting."""
    model = text_encoder.model
    with torch.inference_mode():
        return Conditioning(encode_prompt(text_encoder.tokenizer, model, text), text)


def empty_latent(vae, width, height, batch_size):
    """Zeros [B, C, H / f, W / f] (unscaled latents), as ComfyUI's EmptyLatentImage.

    One zero sample seen B times (a stride-0 view): a batch costs the memory of one until a node computes
    from it, so a size that sampling then refuses (core/memory.py) has allocated next to nothing. Every
    operation that makes a new tensor from it works as on stored zeros; an in-place write raises."""
    f = vae.config.f
    for name, value in (("width", width), ("height", height)):
        if value % f:
            raise ValueError(f"{name}: {value} is not a multiple of the autoencoder's downsampling factor {f}")
    return torch.zeros(1, vae.config.embed_dim, height // f, width // f).expand(batch_size, -1, -1, -1)


def encode_image(vae, image, tile_above=TILE_ABOVE, progress=None):
    """IMAGE [B, H, W, 3] in 0..1 -> the posterior mean latent [B, C, H / f, W / f] (deterministic);
    tiled when a side exceeds `tile_above` latent pixels, with progress(done, total) over the tiles."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [batch, height, width, 3], got {list(image.shape)}")
    device, dtype = placement(vae)
    x = image.movedim(-1, 1).to(device, dtype) * 2 - 1
    with torch.inference_mode():
        tiled = max(x.shape[-2:]) > tile_above * vae.config.f
        return (vae.encode_tiled(x, progress=progress) if tiled else vae.encode(x)).mode().float().cpu()


def encode_masked_image(vae, image, mask, grow_mask_by):
    """VAEEncodeForInpaint's parts, keeping the image: (latent of the image, noise mask grown by
    grow_mask_by pixels, latent of the image with the masked pixels gray, for inpainting models)."""
    noise_mask = grow_mask(mask, image.shape[1:3], grow_mask_by)
    return encode_image(vae, image), noise_mask, encode_image(vae, masked_pixels(image, mask))


def decode_latent(vae, latent, tile_above=TILE_ABOVE, progress=None):
    """Unscaled latent -> IMAGE [B, H, W, 3] in 0..1; tiled when a side exceeds `tile_above` latent pixels,
    with progress(done, total) over the tiles."""
    device, dtype = placement(vae)
    gpu_layout(vae)
    z = latent.to(device, dtype)
    with torch.inference_mode():
        x = vae.decode_tiled(z, progress=progress) if max(z.shape[-2:]) > tile_above else vae.decode(z)
    if not torch.isfinite(x).all():
        raise FloatingPointError("decoding gave NaN or inf: decode in fp32 (precision fp32 or auto)")
    return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


def sampler_options(sampler_name, eta, ddpm_variance):
    """Options for the sampler: eta -1 keeps its own default; an eta for a sampler without one is refused."""
    accepts = inspect.signature(get_sampler(sampler_name)).parameters
    options = {}
    if eta >= 0:
        if "eta" not in accepts:
            raise ValueError(f"eta: the {sampler_name} sampler takes no eta; leave it at -1")
        options["eta"] = eta
    if "variance" in accepts:
        options["variance"] = ddpm_variance
    return options


def run_sigmas(model, spec, denoise, sigmas=None):
    """The sigmas a run visits. denoise d < 1 follows ComfyUI: build int(steps / d) steps and keep the
    last `steps`. Linked sigmas are used as given and cannot be combined with d < 1; ending above 0
    (SplitSigmas' first part, FlipSigmas) the run stops at that noise level, as k-diffusion's samplers do."""
    if spec.zero_terminal_snr and model.prediction == "eps":
        raise ValueError("zero_terminal_snr: this model predicts eps, which is undefined at zero terminal SNR "
                         "(the last step holds no signal); turn zero_terminal_snr off")
    model_schedule = model.schedule
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise: must be in [0, 1], got {denoise}")
    if sigmas is not None:
        if denoise < 1.0:
            raise ValueError("denoise: must be 1 when sigmas are linked; cut the sigmas instead (SplitSigmas)")
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if len(sigmas) < 2 or sigmas[-1] < 0 or (sigmas[1:] >= sigmas[:-1]).any():
            raise ValueError("sigmas: must be descending, at least two values, the last one 0 or above")
        return sigmas
    if denoise == 1.0:
        return spec.sigmas(model_schedule)
    total = int(spec.steps / denoise) if denoise > 0 else 0
    if total < spec.steps or total == 0:
        return torch.zeros(1, dtype=torch.float64)  # nothing to denoise
    return spec.sigmas(model_schedule, total)[-(spec.steps + 1):]


_SIZE_WARNED = set()  # (model, width, height) already warned about


def warn_size(model, latent_shape):
    """One line on stderr, once per model and size, when a model whose file gives its training resolution
    samples at another size: small models rarely generalise beyond the size they saw."""
    if not (model.resolution and model.factor):
        return
    height, width = (n * model.factor for n in latent_shape[-2:])
    key = (model.name, width, height)
    if (height, width) == (model.resolution, model.resolution) or key in _SIZE_WARNED:
        return
    _SIZE_WARNED.add(key)
    print(f"ldm_nodes: {model.name or 'this model'} was trained on {model.resolution}x{model.resolution} images; "
          f"sampling at {width}x{height} may give poor pictures (set width and height to {model.resolution})",
          file=sys.stderr)


def sample(model, latent, positive, negative, *, seed, sigmas, sampler_name, cfg, eta=-1.0, guidance_rescale=0.0,
           ddpm_variance="beta_tilde", noise_mask=None, masked_latent=None, callback=None, on_estimate=None,
           on_note=None):
    """Denoise an unscaled latent [B, C, h, w] along `sigmas`; returns the unscaled result on the CPU.

    Everything after `negative` is passed by name, so two adjacent numbers cannot be swapped.
    Noise (contract): g = Generator("cpu").manual_seed(seed), the initial noise randn(latent.shape, g)
    drawn first, then the sampler's step noise from the same g. The start is
    x = z + noise * sigma_0 for a given latent z (exact: x = x0 + sigma eps), and
    x = noise * sqrt(1 + sigma_0^2) for an empty (all-zero) latent: the marginal of unit-variance data.
    noise_mask (a MASK in image pixels, 1 = repaint; LATENT["noise_mask"]): inpainting with ComfyUI's
    rule (core/inpaint.py); the kept region is noised with the same initial noise, so no draw is added.
    masked_latent: the unscaled latent of the masked image, for an inpainting model's extra inputs.
    on_estimate(seconds): called before the first step, for a latent larger than eta.ESTIMATE_ABOVE positions,
    with the estimated seconds of one network call (core/eta.py), so a long run can say so at once.
    on_note(text): hears what takes long before the first step, or went wrong without stopping the run: a
    model marked `compile` (LDMCompileModel) being compiled for this CPU (core/compiled.py), or why not.
    """
    for name, value in (("cfg", cfg), ("eta", eta), ("guidance_rescale", guidance_rescale)):
        if not math.isfinite(value):  # NaN passes every min/max check, and would be taken as eta's default
            raise InputError(name, f"{value} is not a finite number")
    options = sampler_options(sampler_name, eta, ddpm_variance)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: must be in [0, 2^64 - 1], got {seed}")
    mask = latent_mask(noise_mask, latent.shape) if noise_mask is not None else None
    warn_size(model, latent.shape)
    z = latent.float() * model.scale_factor
    network = inpainting_network(model, mask, z, masked_latent, on_note)
    if len(sigmas) < 2:
        return latent.clone()
    param = next(model.network.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latent.shape, generator=generator)
    sigma_0 = float(sigmas[0])
    start_scale = math.sqrt(1 + sigma_0**2) if not latent.any() else sigma_0
    x = (z + noise * start_scale).to(param.device)  # the sampler's state stays fp32; fast_network casts
    cond = positive.context.to(param.device, param.dtype)
    uncond = negative.context.to(param.device, param.dtype) if negative is not None else None
    denoiser = Denoiser(network, model.schedule, model.prediction, cond, uncond, cfg, guidance_rescale)
    if mask is not None:
        denoiser = MaskedDenoiser(denoiser, z.to(x), noise.to(x), mask.to(x))
    with torch.inference_mode():
        if on_estimate is not None:
            _estimate_call(model, cond, uncond, cfg, guidance_rescale, sigma_0, x.shape, on_estimate)
        try:
            x = get_sampler(sampler_name)(denoiser, x, sigmas, generator=generator, callback=callback, **options)
        except NonFiniteError as error:
            raise NonFiniteError(f"{error}. Likely cause: {_likely_cause(latent, param.dtype, cfg)}") from None
    out = (x.float() / model.scale_factor).cpu()
    return out if mask is None else keep_outside(out, latent.float(), mask)


def _estimate_call(model, cond, uncond, cfg, guidance_rescale, sigma, shape, on_estimate):
    """on_estimate(seconds of one guided network call on a latent of `shape`), from small trial calls of
    the same network, guidance and contexts (an inpainting model's extra channels as zeros)."""
    network = lambda x, t, context: run_fp32(model.network, x, t, context)  # eager: no CUDA graphs of trial sizes
    trial = Denoiser(network, model.schedule, model.prediction, cond, uncond, cfg, guidance_rescale)
    param = next(model.network.parameters())
    seconds = call_seconds(lambda x: trial(x, sigma), shape[0], model.in_channels, shape[2], shape[3], param.device)
    if seconds is not None:
        on_estimate(seconds)


def inpainting_network(model, mask, z, masked_latent, note=None):
    """The network to sample with (accel.fast_network, compiled when the model says so): an inpainting model
    (more input channels than the latent has) reads cat(x_t, mask, masked image latent) and is refused
    without a mask; any other model is used as is."""
    network = fast_network(model.network, model.compile, note)
    in_channels = model.in_channels
    if in_channels == model.latent_channels:
        return network
    if mask is None:
        raise InputError("latent", f"{model.name or 'the model'} is an inpainting model ({in_channels} input "
                         "channels) and needs a mask, but the latent has no noise_mask: give LDMEncodeImage a "
                         "mask, or link SetLatentNoiseMask")
    masked = z if masked_latent is None else masked_latent.float() * model.scale_factor
    if masked.shape[1:] != z.shape[1:]:
        raise InputError("latent", f"masked_latent {list(masked.shape)} does not match the latent {list(z.shape)}")
    extra = concat_inputs(mask, repeat_to_batch(masked, len(z)))
    if in_channels != model.latent_channels + extra.shape[1]:
        raise InputError("model", f"{model.name or 'this model'} has {in_channels} input channels; an inpainting "
                         f"model has {model.latent_channels + extra.shape[1]} (latent, mask, masked image)")
    return ConcatInputs(network, extra.to(next(model.network.parameters()).device))


def _likely_cause(latent, dtype, cfg):
    """Why sampling diverged, from what is known: the weights were found finite at load and the
    FLOAT inputs at validation, so what remains is the input latent, the precision or the guidance."""
    if not torch.isfinite(latent).all():
        return "the input latent already held NaN or inf (check the node that made it)"
    if dtype == torch.float16:
        return "the model runs in fp16, whose range (65504) overflowed; use precision fp32 or bf16"
    if cfg > 10:
        return f"cfg {cfg:g} amplifies the prediction; lower it"
    return f"the sampler diverged with finite weights and inputs in {str(dtype).removeprefix('torch.')}; try another sampler or more steps"


def check_bound_image(model, vae, image):
    """Refuse an image (IMAGE [B, H, W, 3]) or a model that has no bound, before any work."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [batch, height, width, 3] (RGB), got {list(image.shape)}")
    height, width = image.shape[1:3]
    if model.resolution and (height, width) != (model.resolution, model.resolution):
        raise ValueError(f"image: {width}x{height}, but this model was trained on {model.resolution}x"
                         f"{model.resolution} images; resize it")
    multiple = vae.config.f * getattr(model.network.config, "patch_size", 1)
    if height % multiple or width % multiple:
        raise ValueError(f"image: {width}x{height} is not a multiple of {multiple} (the autoencoder's f times "
                         f"the denoiser's patch size)")
    if model.in_channels != model.latent_channels:
        raise InputError("model", f"{model.name or 'this model'} is an inpainting model: it models the masked "
                         "region given the rest, not whole images, so it has no likelihood of an image")
    if not hasattr(model.schedule, "num_timesteps"):
        raise ValueError("model: has no known training schedule, and the bound needs the alpha_bar it was "
                         "trained with")


def bound_data(model, vae, image):
    """The data x0 [B, C, h, w] (float64) whose bound the model gives, from IMAGE [B, H, W, 3] in 0..1: pixel
    models the 8-bit image itself in [-1, 1], latent models the scaled posterior-mean latent, scale * E(x).mode()."""
    check_bound_image(model, vae, image)
    if model.pixel_space:
        return ((image.double() * 255).round() / 127.5 - 1).movedim(-1, 1)  # the 8-bit grid L_0 expects
    return encode_image(vae, image).double() * model.scale_factor


def counted_network(model, columns, rows, batch_size, progress=None):
    """model.network as the bound calls it, network(x, t, context), in the model's dtype and device, returning
    float32; progress(done, calls) after each call (core/likelihood.counted)."""
    device, dtype = placement(model.network)
    net = cpu_layout(model.network)
    return counted(lambda x, t, c: net(x.to(dtype), t, c.to(device, dtype)).float(), columns, rows, batch_size,
                   progress)


def likelihood(model, vae, image, context=None, variance="beta_tilde", steps=0, seed=0, progress=None):
    """The variational bound of each image of IMAGE [B, H, W, 3] in 0..1 (core/likelihood.py).

    Pixel-space models score the 8-bit image itself (bits/dim, L_0 the discretised decoder); latent
    models score the scaled posterior-mean latent, scale * E(x).mode() (nats per latent dimension).
    context: [1, L, D], default the empty prompt. steps: 0 evaluates all T timesteps, K >= 2 a strided
    estimate with its standard error. seed: the noise draws. progress(done, total) is called per
    network call. Returns a VariationalBound."""
    check_bound_image(model, vae, image)
    T = model.schedule.num_timesteps
    check_bound_steps(steps, T)
    device, _ = placement(model.network)
    x0 = bound_data(model, vae, image)
    context = model.empty_context if context is None else context
    batch = 64
    network = counted_network(model, T if steps == 0 else steps + 1, len(x0), batch, progress)
    with torch.inference_mode():
        return variational_bound(network, x0.float().to(device), model.schedule, model.prediction, context.to(device),
                                 variance, discrete=model.pixel_space, timesteps=steps or None,
                                 generator=torch.Generator("cpu").manual_seed(seed), batch_size=batch)

