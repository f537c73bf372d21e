"""LDMSamplerSelect: this pack's samplers as ComfyUI's SAMPLER, for core's SamplerCustom and
SamplerCustomAdvanced on any MODEL core loaded.

ComfyUI's convention (comfy/samplers.py KSAMPLER): a SAMPLER wraps a function with k-diffusion's
signature `(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`, where
`model(x, sigma * ones(batch), **extra_args)` gives the denoised x0 and x starts at sigmas[0] (KSAMPLER
scales the noise and the latent for the model first, and back at the end). Our samplers
(core/samplers.py) take `denoiser(x, sigma) -> x0` on the same x = x0 + sigma * eps, so the adapter
below only broadcasts sigma and passes ComfyUI's extra_args (conditioning, model options, mask)
through. Step noise comes from a CPU generator seeded with extra_args["seed"] (SamplerCustom's
noise_seed), drawn as the pack's contract says.

The host builds the SAMPLER object (nodes/host.py `sampler`): inside ComfyUI a KSAMPLER around the
function, so nodes/ never imports comfy; headless, the plain function. The t-space rules (ddpm, ddim,
plms) read alpha_bar = 1 / (1 + sigma^2) off each sigma: they fit models with variance-preserving
noise (SD1.x, SD2.x, SDXL), not flow-matching models such as SD3 or Flux.
"""
import torch

from ..core.pipeline import sampler_options
from ..core.samplers import SAMPLERS, get_sampler
from . import host
from .sample import DDPM_VARIANCE_INPUT, ETA_INPUT


def k_diffusion_sampler(sampler_name, options):
    """The pack's sampler `sampler_name` with `options`, as a k-diffusion sampling function."""
    sample = get_sampler(sampler_name)

    def function(model, x, sigmas, extra_args=None, callback=None, disable=None, **more):
        extra_args = {} if extra_args is None else extra_args
        seed = extra_args.get("seed")
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        ones = x.new_ones([x.shape[0]])

        def denoiser(x, sigma):
            return model(x, sigma * ones, **extra_args)

        return sample(denoiser, x, sigmas, generator=generator, callback=callback, **{**options, **more})

    function.__name__ = f"sample_ldm_{sampler_name}"
    return function


class LDMSamplerSelect:
    DESCRIPTION = ("This pack's samplers as ComfyUI's SAMPLER, for SamplerCustom and SamplerCustomAdvanced with "
                   "any MODEL: ddpm with either fixed variance (beta_tilde or beta), ddim with eta, plms, and the "
                   "pack's versions of the others. Step noise comes from a CPU generator seeded with the noise "
                   "seed. For models with variance-preserving noise (SD1.x, SD2.x, SDXL), not flow models.")
    CATEGORY = "latent diffusion"
    FUNCTION = "select"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": (list(SAMPLERS), {
                "default": "ddpm",
                "tooltip": "ddpm: DDPM's ancestral sampling (Algorithm 2). ddim: DDIM, eta 0 deterministic. plms: "
                           "pseudo linear multistep (PNDM). euler, heun, euler_ancestral, dpmpp_2m, dpmpp_2m_sde: "
                           "the pack's own versions of k-diffusion's."}),
            "eta": ETA_INPUT,
            "ddpm_variance": DDPM_VARIANCE_INPUT,
        }}

    def select(self, sampler_name, eta, ddpm_variance):
        options = sampler_options(sampler_name, eta, ddpm_variance)  # an eta the sampler lacks is refused here
        return (host.sampler(k_diffusion_sampler(sampler_name, options)),)
