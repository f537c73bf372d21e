"""LDMLikelihood: how many bits a model needs for an image, and which timesteps cost them."""
import numpy as np
import torch

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
        core = model.get()
        progress = host.progress(1)

        def update(done, total):
            progress.total = total
            progress.update(done)

        context = conditioning.context if conditioning is not None else None
        bound = likelihood(core, vae.get(), image, context, variance, steps, progress=update)
        plot = torch.from_numpy(np.asarray(plot_bound(bound), dtype=np.float32) / 255)[None]
        return (float(bound.total.mean()), plot)
