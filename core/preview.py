"""Cheap step previews: a linear map from latent channels to RGB, fitted once per autoencoder.

Decoding every step would cost as much as the sampling itself, so previews use rgb = z A + b per
latent pixel, with A and b fitted by least squares to what the decoder makes of random latents
(each decoded image averaged over the f x f pixels a latent pixel covers).
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .autoencoder import placement


@torch.no_grad()
def fit_latent_to_rgb(vae, size=16, samples=4, seed=0):
    """(A [C, 3], b [3]) mapping unscaled latents to RGB in [-1, 1]."""
    device, dtype = placement(vae)
    g = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn(samples, vae.config.embed_dim, size, size, generator=g)
    x = vae.decode(z.to(device, dtype)).float().cpu()
    rgb = F.avg_pool2d(x, vae.config.f)  # [S, 3, size, size]
    design = torch.cat([z.movedim(1, -1).reshape(-1, z.shape[1]), torch.ones(z[:, :1].numel(), 1)], 1)
    solution = torch.linalg.lstsq(design.double(), rgb.movedim(1, -1).reshape(-1, 3).double()).solution.float()
    return solution[:-1], solution[-1]


def latent_preview(latent, latent_to_rgb):
    """The first image of an unscaled latent batch [B, C, h, w] as a small PIL image."""
    a, b = latent_to_rgb
    rgb = latent[0].float().cpu().movedim(0, -1) @ a + b
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))
