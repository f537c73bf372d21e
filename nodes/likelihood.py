"""LDMLikelihood: how many bits a model needs for an image, and which timesteps cost them; LDMComfyLikelihood:
the same for the models ComfyUI loads itself."""
import numpy as np
import torch

from ..core.likelihood import check_bound_steps, denoiser_likelihood
from ..core.objective import VARIANCES
from ..core.pipeline import likelihood
from ..core.plot import plot_bound
from . import host


class LDMLikelihood:
    DESCRIPTION = ("Scores images under the model with DDPM's variational bound (Ho et al. 2020, eq. 5): "
                   "L_T + the sum of L_t-1 over the timesteps + L_0. Pixel-space models give bits per "
                   "dimension of the 8-bit image (the paper's NLL); latent models give nats per dimension of "
                   "the image's latent, which is not comparable with bits/dim of pixels.")
    CATEGORY = "latent diffusion"
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "IMAGE")
    RETURN_NAMES = ("nll", "plot")
    OUTPUT_TOOLTIPS = ("The bound averaged over the batch: bits/dim (pixel models) or nats/dim of the latent "
                       "(latent models); the plot's title says which.",
                       "The per-timestep terms against t (log scale), L_0 in red, with the unit on the axis.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("LDM_MODEL", {"tooltip": "The model from LDMLoadModel (its training schedule is used)."}),
                "vae": ("LDM_VAE", {"tooltip": "Its autoencoder: the identity for pixel-space models."}),
                "image": ("IMAGE", {"tooltip": "RGB images at the model's training size."}),
                "variance": (list(VARIANCES), {
                    "default": "beta_tilde",
                    "tooltip": "The fixed reverse-process variance sigma_t^2: the posterior's beta-tilde_t or "
                               "beta_t (DDPM section 3.2)."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                  "tooltip": "0: every timestep t = 2..T (exact in t, as the paper). K >= 2: K "
                                             "random timesteps per image, an unbiased estimate with its "
                                             "standard error, about T / K times faster."}),
            },
            "optional": {
                "conditioning": ("LDM_CONDITIONING", {"tooltip": "The caption to condition on; unlinked: the "
                                                                 "empty prompt."}),
            },
        }

    def score(self, model, vae, image, variance, steps, conditioning=None):
        context = conditioning.context if conditioning is not None else None
        bound = likelihood(model.get(), vae.get(), image, context, variance, steps, progress=host.late_progress())
        return (float(bound.total.mean()), as_image(plot_bound(bound)))


def as_image(picture):
    """A plot (PIL RGB) as ComfyUI's IMAGE [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None]


class LDMComfyLikelihood:
    DESCRIPTION = ("LDMLikelihood for the models ComfyUI itself loads (CheckpointLoaderSimple: SD1.x, SD2.x "
                   "including v-prediction, SDXL and their fine-tunes, with any LoRA or patch applied): the "
                   "variational bound of the image's latent, in nats per latent dimension, per timestep, read "
                   "from the model's own discrete schedule and prediction type.")
    CATEGORY = "latent diffusion"
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "IMAGE")
    RETURN_NAMES = ("nll", "plot")
    OUTPUT_TOOLTIPS = LDMLikelihood.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        ours = LDMLikelihood.INPUT_TYPES()["required"]
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "ComfyUI's MODEL (its sampling object gives the schedule)."}),
                "vae": ("VAE", {"tooltip": "The model's VAE: the image is scored as its scaled latent."}),
                "image": ("IMAGE", {"tooltip": "RGB images, each side a multiple of the VAE's factor (8)."}),
                "conditioning": ("CONDITIONING", {"tooltip": "The caption to condition on (CLIPTextEncode)."}),
                "variance": ours["variance"],
                "steps": ours["steps"],
            },
        }

    def score(self, model, vae, image, conditioning, variance, steps):
        check_bound_steps(steps, host.model_timesteps(model))  # before the VAE's work
        latent = host.encode(vae, image)
        progress = host.late_progress()

        def work(denoise, x0, sigmas, batch):
            return denoiser_likelihood(denoise, x0, sigmas, variance, steps, progress=progress, batch=batch)

        bound = host.run_under_model(model, conditioning, latent, work)
        return (float(bound.total.mean()), as_image(plot_bound(bound)))
