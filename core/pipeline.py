"""Text-to-image and image-to-image with a loaded checkpoint: the steps the nodes expose, as functions.

Latents outside this module are the autoencoder's *unscaled* latents (ComfyUI's LATENT convention);
`sample` multiplies by the model's scale factor on the way in and divides on the way out, so the
denoiser, the samplers and SIGMAS all work on scaled latents and mean what ComfyUI's mean.
"""
import inspect
import math
from dataclasses import dataclass

import torch

from .accel import channels_last, fast_network
from .autoencoder import IdentityAutoencoder, placement
from .denoiser import Denoiser
from .likelihood import variational_bound
from .samplers import get_sampler
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

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The denoiser of a loaded checkpoint with its schedule, prediction and its autoencoder's latent scale."""
        vae = checkpoint.vae.config
        with torch.inference_mode():
            empty = encode_prompt(CLIPTokenizer(), checkpoint.text_encoder, "")
        return cls(checkpoint.denoiser, checkpoint.schedule, checkpoint.prediction, vae.scale_factor, vae.embed_dim,
                   isinstance(checkpoint.vae, IdentityAutoencoder), checkpoint.resolution, empty)


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

    beta_schedule: str
    steps: int
    spacing: str
    zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.beta_schedule != "model" and self.beta_schedule not in BETA_SCHEDULES:
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
    """Zeros [B, C, H / f, W / f] (unscaled latents), as ComfyUI's EmptyLatentImage."""
    f = vae.config.f
    for name, value in (("width", width), ("height", height)):
        if value % f:
            raise ValueError(f"{name}: {value} is not a multiple of the autoencoder's downsampling factor {f}")
    return torch.zeros(batch_size, vae.config.embed_dim, height // f, width // f)


def encode_image(vae, image):
    """IMAGE [B, H, W, 3] in 0..1 -> the posterior mean latent [B, C, H / f, W / f] (deterministic)."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [batch, height, width, 3], got {list(image.shape)}")
    device, dtype = placement(vae)
    x = image.movedim(-1, 1).to(device, dtype) * 2 - 1
    with torch.inference_mode():
        return vae.encode(x).mode().float().cpu()


def decode_latent(vae, latent, tile_above=96):
    """Unscaled latent -> IMAGE [B, H, W, 3] in 0..1; tiled when a side exceeds `tile_above` latent pixels."""
    device, dtype = placement(vae)
    if device.type == "cuda":
        channels_last(vae)
    z = latent.to(device, dtype)
    with torch.inference_mode():
        x = vae.decode_tiled(z) if max(z.shape[-2:]) > tile_above else vae.decode(z)
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


def sample(model, latent, positive, negative, seed, sampler_name, cfg, sigmas, guidance_rescale=0.0,
           eta=-1.0, ddpm_variance="beta_tilde", callback=None):
    """Denoise an unscaled latent [B, C, h, w] along `sigmas`; returns the unscaled result on the CPU.

    Noise (contract): g = Generator("cpu").manual_seed(seed), the initial noise randn(latent.shape, g)
    drawn first, then the sampler's step noise from the same g. The start is
    x = z + noise * sigma_0 for a given latent z (exact: x = x0 + sigma eps), and
    x = noise * sqrt(1 + sigma_0^2) for an empty (all-zero) latent: the marginal of unit-variance data.
    """
    options = sampler_options(sampler_name, eta, ddpm_variance)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: must be in [0, 2^64 - 1], got {seed}")
    if len(sigmas) < 2:
        return latent.clone()
    param = next(model.network.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latent.shape, generator=generator)
    sigma_0 = float(sigmas[0])
    z = latent.float() * model.scale_factor
    start_scale = math.sqrt(1 + sigma_0**2) if not latent.any() else sigma_0
    x = (z + noise * start_scale).to(param.device, param.dtype)
    cond = positive.context.to(param.device, param.dtype)
    uncond = negative.context.to(param.device, param.dtype) if negative is not None else None
    denoiser = Denoiser(fast_network(model.network), model.schedule, model.prediction, cond, uncond, cfg, guidance_rescale)
    with torch.inference_mode():
        x = get_sampler(sampler_name)(denoiser, x, sigmas, generator=generator, callback=callback, **options)
    return (x.float() / model.scale_factor).cpu()


def likelihood(model, vae, image, context=None, variance="beta_tilde", steps=0, seed=0, progress=None):
    """The variational bound of each image of IMAGE [B, H, W, 3] in 0..1 (core/likelihood.py).

    Pixel-space models score the 8-bit image itself (bits/dim, L_0 the discretised decoder); latent
    models score the scaled posterior-mean latent, scale * E(x).mode() (nats per latent dimension).
    context: [1, L, D], default the empty prompt. steps: 0 evaluates all T timesteps, K >= 2 a strided
    estimate with its standard error. seed: the noise draws. progress(done, total) is called per
    network call. Returns a VariationalBound."""
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
    if not hasattr(model.schedule, "num_timesteps"):
        raise ValueError("model: has no known training schedule, and the bound needs the alpha_bar it was "
                         "trained with")
    T = model.schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == 0 or 2 <= steps <= T - 1):
        raise ValueError(f"steps: 0 (all {T} timesteps) or a strided estimate of 2..{T - 1}, got {steps!r}")
    device, dtype = placement(model.network)
    if model.pixel_space:
        x0 = ((image.double() * 255).round() / 127.5 - 1).movedim(-1, 1)  # the 8-bit grid L_0 expects
    else:
        x0 = encode_image(vae, image).double() * model.scale_factor
    context = model.empty_context if context is None else context
    batch = 64
    calls = [0, math.ceil((T if steps == 0 else steps + 1) / max(1, batch // len(x0)))]

    def network(x, t, c):
        out = model.network(x.to(dtype), t, c.to(device, dtype)).float()
        calls[0] += 1
        if progress:
            progress(calls[0], calls[1])
        return out

    with torch.inference_mode():
        return variational_bound(network, x0.float().to(device), model.schedule, model.prediction, context.to(device),
                                 variance, discrete=model.pixel_space, timesteps=steps or None,
                                 generator=torch.Generator("cpu").manual_seed(seed), batch_size=batch)
