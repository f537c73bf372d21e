"""Step previews: the sampler's current x0 prediction as a picture the size of the final image.

Three ways, cheapest that is right first (`preview_method`):
- decode: the model's own autoencoder decodes the prediction, so the last step's preview is the final
  image. Used while the decoder is small for the latent (decoder parameters x latent positions up to
  DECODE_BUDGET): every pixel-space model (no weights), and the built-in autoencoders (under a million
  parameters, 16x16 latents) cost about as much as one UNet evaluation per step, or less.
- sd1: ComfyUI's latent-to-RGB factors for Stable Diffusion 1.x latents (comfy/latent_formats.py, SD15),
  a linear map per latent pixel, for files in SD1's autoencoder layout, whose decoder (49 M parameters)
  would cost seconds per step on a CPU. Every SD1.x model shares that latent space.
- fit: any other large autoencoder: rgb = z A + b per latent pixel, A and b fitted by least squares to
  what the decoder makes of random latents (each decoded image averaged over the f x f pixels a latent
  pixel covers).
The linear maps give one pixel per latent pixel; the preview is scaled up to the image's size.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .autoencoder import IdentityConfig, placement
from .data import make_dataset
from .pipeline import decode_latent

DECODE_BUDGET = 2 ** 30  # decoder parameters x latent positions, for decoding previews (built-in: 2.4e8)
# ComfyUI 0.3.64 comfy/latent_formats.py, class SD15: RGB from the *scaled* latent (x 0.18215), in [-1, 1]
SD15_LATENT_RGB_FACTORS = ((0.3512, 0.2297, 0.3227),
                           (0.3250, 0.4974, 0.2350),
                           (-0.2829, 0.1762, 0.2721),
                           (-0.2120, -0.2616, -0.7177))
SD15_SCALE_FACTOR = 0.18215


def decoder_parameters(vae):
    decoder = getattr(vae, "decoder", None)
    return 0 if decoder is None else sum(p.numel() for p in decoder.parameters())


def is_sd1_layout(config):
    """Whether an autoencoder config is Stable Diffusion 1.x's (4 latent channels, f = 8, its widths)."""
    return (not isinstance(config, IdentityConfig) and config.embed_dim == 4 and config.f == 8
            and config.ch == 128 and tuple(config.ch_mult) == (1, 2, 4, 4))


def preview_method(vae, latent_shape):
    """"decode", "sd1" or "fit" for latents of `latent_shape` [B, C, h, w] (see the module's docstring)."""
    if decoder_parameters(vae) * latent_shape[-2] * latent_shape[-1] <= DECODE_BUDGET:
        return "decode"
    return "sd1" if is_sd1_layout(vae.config) else "fit"


def sd1_latent_to_rgb():
    """(A [4, 3], b [3]) for unscaled latents: ComfyUI's factors, which take latents scaled by 0.18215."""
    return torch.tensor(SD15_LATENT_RGB_FACTORS) * SD15_SCALE_FACTOR, torch.zeros(3)


@torch.no_grad()
def fit_latent_to_rgb(vae, samples=16, seed=0):
    """(A [C, 3], b [3]) mapping unscaled latents to RGB in [-1, 1], fitted on real latents: those of
    `samples` procedural pictures (core/data.py), each pixel's colour averaged over the f x f pixels a
    latent pixel covers (the autoencoder gives back its pictures, so these are what it decodes)."""
    device, dtype = placement(vae)
    images = make_dataset(samples, seed)[0].float() / 127.5 - 1  # [S, 3, 64, 64] in [-1, 1]
    z = vae.encode(images.to(device, dtype)).mean.float().cpu()
    rgb = F.avg_pool2d(images, vae.config.f)  # [S, 3, 64 / f, 64 / f]
    design = torch.cat([z.movedim(1, -1).reshape(-1, z.shape[1]), torch.ones(z[:, :1].numel(), 1)], 1)
    solution = torch.linalg.lstsq(design.double(), rgb.movedim(1, -1).reshape(-1, 3).double()).solution.float()
    return solution[:-1], solution[-1]


def latent_preview(latent, latent_to_rgb, f=1):
    """The first image of an unscaled latent batch [B, C, h, w] through a linear map, as a PIL image of
    the decoded size (h f x w f)."""
    a, b = latent_to_rgb
    rgb = latent[:1].float().cpu().movedim(1, -1) @ a + b  # [1, h, w, 3] in [-1, 1]
    rgb = F.interpolate(rgb.movedim(-1, 1), scale_factor=f, mode="bilinear", align_corners=False) if f > 1 \
        else rgb.movedim(-1, 1)
    return _to_pil((rgb[0].movedim(0, -1).clamp(-1, 1) + 1) / 2)


def decoded_preview(vae, latent):
    """The first image of an unscaled latent batch, decoded by the model's autoencoder, as a PIL image;
    None when the decode is not finite (an fp16 autoencoder on an early, wild x0 prediction): a step
    without a preview, not a failed run."""
    try:
        return _to_pil(decode_latent(vae, latent[:1])[0])
    except FloatingPointError:
        return None


def _to_pil(image):
    """[H, W, 3] in 0..1 -> PIL image."""
    pixels = (image * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))
