"""LDMSample: denoise a latent, with guidance, along a schedule."""
import torch

from ..core.eta import duration
from ..core.memory import check_fits
from ..core.pipeline import run_sigmas, sample
from ..core.objective import VARIANCES
from ..core.samplers import SAMPLERS
from . import host

DDPM_VARIANCES = list(VARIANCES)
# The sampler settings LDMSamplerSelect offers too: one definition, so their ranges cannot drift apart.
ETA_INPUT = ("FLOAT", {"default": -1.0, "min": -1.0, "max": 2.0, "step": 0.01,
                       "tooltip": "Noise of stochastic samplers; -1 keeps the sampler's default (0 for ddim; 1 for "
                                  "ddpm, euler_ancestral, dpmpp_2m_sde)."})
DDPM_VARIANCE_INPUT = (DDPM_VARIANCES, {"default": "beta_tilde",
                                        "tooltip": "ddpm only: the fixed reverse variance, the posterior's "
                                                   "beta-tilde or beta."})


class LDMSample:
    DESCRIPTION = ("Runs the reverse diffusion: starts from noise (an empty latent) or from a given latent "
                   "(denoise below 1: image-to-image) and steps through the schedule's sigmas with the chosen "
                   "sampler and classifier-free guidance. All noise comes from a CPU generator seeded with "
                   "`seed`, so a seed gives the same image on CPU and GPU.")
    CATEGORY = "latent diffusion"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("LATENT", "denoised_steps")
    OUTPUT_TOOLTIPS = ("The denoised latent (decode it with LDMDecodeLatent).",
                       "The model's prediction of the clean latent (x0) after each step, step by step (all "
                       "images of the batch at step 1, then at step 2, ...): decode it with LDMDecodeLatent to "
                       "see how the sampler forms the picture.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("LDM_MODEL", {"tooltip": "The model from LDMLoadModel."}),
                "schedule": ("LDM_SCHEDULE", {"tooltip": "The schedule from LDMNoiseSchedule."}),
                "positive": ("LDM_CONDITIONING", {"tooltip": "What the image should show."}),
                "negative": ("LDM_CONDITIONING", {"tooltip": "What guidance steers away from; the empty prompt "
                                                             "is the usual choice."}),
                "latent": ("LATENT", {"tooltip": "LDMEmptyLatent for text-to-image, LDMEncodeImage for "
                                                 "image-to-image. With a noise_mask (LDMEncodeImage's mask or "
                                                 "core's SetLatentNoiseMask) only the masked region is repainted "
                                                 "and the rest of the latent is kept exactly."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the CPU generator all noise is drawn from."}),
                "sampler_name": (list(SAMPLERS), {
                    "default": "dpmpp_2m",
                    "tooltip": "ddpm: DDPM's ancestral sampling. ddim: DDIM (eta 0 deterministic). euler, heun: "
                               "Karras' ODE steps. euler_ancestral, dpmpp_2m_sde: stochastic. dpmpp_2m: DPM-Solver++(2M). "
                               "plms: pseudo linear multistep."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 turns guidance off."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1: from pure noise. Below 1: the last denoise fraction of a "
                                                 "longer schedule, starting from the given latent."}),
            },
            "optional": {
                "sigmas": ("SIGMAS", {"tooltip": "When linked, replaces the schedule's sigmas (descending; a last "
                                                 "sigma above 0 stops there, noisy); denoise must then be 1."}),
                "eta": ETA_INPUT,
                "guidance_rescale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                               "tooltip": "Rescale the guided prediction's spread towards the "
                                                          "conditional one (Lin et al. 2023); 0.7 with "
                                                          "zero_terminal_snr."}),
                "ddpm_variance": DDPM_VARIANCE_INPUT,
            },
        }

    def sample(self, model, schedule, positive, negative, latent, seed, sampler_name, cfg, denoise,
               sigmas=None, eta=-1.0, guidance_rescale=0.0, ddpm_variance="beta_tilde"):
        # previews need the autoencoder: load it (and fit a preview map) before the UNet, not mid-sampling
        preview = model.previewer(latent["samples"].shape) if host.in_comfyui() else None
        core = model.get()
        run = run_sigmas(core, schedule, denoise, sigmas)
        context_tokens = max(c.context.shape[1] for c in (positive, negative) if c is not None)
        f = model.vae.core.config.f if model.vae is not None else 1  # for the message's pixel sizes
        check_fits("sample", core.network, latent["samples"].shape, f, context_tokens)
        progress = host.progress(len(run) - 1)

        denoised = []  # kept where they are computed; joined once at the end

        def callback(step):
            denoised.append(step["denoised"])
            image = None if preview is None else preview(step["denoised"] / core.scale_factor)
            progress.update(step["i"] + 1, image)

        out = sample(core, latent["samples"], positive, negative, seed=seed, sigmas=run, sampler_name=sampler_name,
                     cfg=cfg, eta=eta, guidance_rescale=guidance_rescale, ddpm_variance=ddpm_variance,
                     noise_mask=latent.get("noise_mask"), masked_latent=latent.get("masked_latent"),
                     callback=callback, on_estimate=lambda seconds: progress.note(
                         f"about {duration(seconds)} a network call at this size (estimated), so about "
                         f"{duration(seconds * (len(run) - 1))} for {len(run) - 1} steps (twice that for a "
                         "second-order sampler)"), on_note=progress.note)
        steps = (torch.cat(denoised).float().cpu() / core.scale_factor) if denoised else out.clone()
        return ({**latent, "samples": out}, {"samples": steps})
