"""Masks and inpainting with ComfyUI's semantics (ComfyUI 0.3.64, read in its source).

A mask is in image pixels, 1 = repaint, 0 = keep; values are clamped to [0, 1].

* Latent noise mask (comfy.sampler_helpers.prepare_mask -> comfy.utils.reshape_mask): the mask,
  as [B or 1, 1, H, W], is resized bilinearly to the latent's h x w and repeated over the latent's
  channels and batch (`latent_mask`).
* The blend (comfy.samplers.KSamplerX0Inpaint): at every denoiser call at noise level sigma the
  kept region of the input is the original scaled latent z noised to sigma with the run's initial
  noise n (no new draw: ComfyUI reuses the noise tensor), x_in = m x + (1 - m)(z + sigma n), and the
  denoised estimate keeps z there, D = m D(x_in) + (1 - m) z (`MaskedDenoiser`). Every sampler sees
  only D, so the rule holds for all of them, for any sigmas (denoise < 1, linked SIGMAS).
* The result keeps the original latent outside the mask (`keep_outside`): m x + (1 - m) z, exact
  where m = 0. (ComfyUI 0.3.64 gets this from the last step's D; earlier versions blended at the
  end as here.)
* grow_mask_by (nodes.VAEEncodeForInpaint): the mask is resized to the image, rounded, dilated by a
  k x k box of ones (conv2d, padding ceil((k - 1) / 2), clamped to 1), cut back to the image size
  and rounded (`grow_mask`).
* Inpainting models (SD1.x inpainting: a UNet with 9 input channels) read
  cat(x_t, mask, masked image latent) (comfy.model_base.BaseModel.concat_cond, diffusers'
  StableDiffusionInpaintPipeline): mask = round(latent mask) on one channel, masked image = the scaled
  latent of the image with the masked pixels set to gray 0.5 (`masked_pixels`), or the latent itself
  when no masked image was encoded (ComfyUI's fallback) (`ConcatInputs`).
* ImageCompositeMasked (comfy_extras.nodes_mask.composite): source pasted onto destination at
  (x, y) through the mask, out = m source + (1 - m) destination (`composite`).
"""
import math

import torch
import torch.nn.functional as F

from .errors import InputError


def mask_4d(mask, name="mask"):
    """A MASK ([H, W], [B, H, W] or [B, 1, H, W]) as [B, 1, H, W] float32; other shapes are refused."""
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        shape = list(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise InputError(name, f"expected a MASK [height, width] or [batch, height, width], got {shape}")
    return mask.float().reshape(-1, 1, *mask.shape[-2:])


def as_mask(mask, name="mask"):
    """mask_4d clamped to [0, 1]."""
    return mask_4d(mask, name).clamp(0, 1)


def repeat_to_batch(tensor, batch):
    """comfy.utils.repeat_to_batch_size: cut or cycle along dim 0 to `batch`."""
    repeats = math.ceil(batch / tensor.shape[0])
    return tensor.repeat(repeats, *[1] * (tensor.ndim - 1))[:batch]


def latent_mask(mask, shape, name="noise_mask"):
    """The noise mask for a latent of `shape` [B, C, h, w]: bilinear to h x w, repeated to C and B."""
    m = F.interpolate(as_mask(mask, name), size=tuple(shape[2:]), mode="bilinear")
    return repeat_to_batch(m.repeat(1, shape[1], 1, 1), shape[0])


def blend(x, y, m):
    """m x + (1 - m) y: x where the mask is 1, y where it is 0."""
    return x * m + y * (1 - m)


def noised(z, noise, sigma):
    """The kept region at noise level sigma: x = z + sigma n (k-diffusion's noise scaling)."""
    return z + noise * sigma


class MaskedDenoiser:
    """KSamplerX0Inpaint: D'(x, sigma) = m D(m x + (1 - m)(z + sigma n)) + (1 - m) z."""

    def __init__(self, denoiser, z, noise, mask):
        self.denoiser, self.z, self.noise, self.mask = denoiser, z, noise, mask

    def __call__(self, x, sigma):
        x_in = blend(x, noised(self.z, self.noise, float(sigma)), self.mask)
        return blend(self.denoiser(x_in, sigma), self.z, self.mask)


def keep_outside(samples, original, mask):
    """The result keeps the original latent where the mask is 0 (exactly)."""
    return blend(samples, original, mask)


def grow_mask(mask, size, grow_mask_by):
    """VAEEncodeForInpaint's mask: resized to `size` (H, W), rounded, dilated by a k x k box, rounded."""
    m = F.interpolate(as_mask(mask), size=tuple(size), mode="bilinear").round()
    if grow_mask_by > 0:
        kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
        m = F.conv2d(m, kernel, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)
    return m[:, :, :size[0], :size[1]].round()


def masked_pixels(image, mask):
    """IMAGE [B, H, W, 3] with the pixels of round(mask) set to gray 0.5 (the inpainting model's masked image)."""
    m = F.interpolate(as_mask(mask), size=image.shape[1:3], mode="bilinear").round()
    keep = 1 - repeat_to_batch(m, image.shape[0]).movedim(1, -1)
    return (image - 0.5) * keep + 0.5


class ConcatInputs(torch.nn.Module):
    """An inpainting network seen as a plain one: network(cat(x_t, mask, masked latent), t, context).

    extra: [B, 1 + C, h, w], repeated along the batch when guidance doubles it."""

    def __init__(self, network, extra):
        super().__init__()
        self.network, self.extra = network, extra

    def forward(self, x_t, t, context):
        extra = self.extra.to(x_t.device, x_t.dtype).repeat(x_t.shape[0] // self.extra.shape[0], 1, 1, 1)
        return self.network(torch.cat([x_t, extra], dim=1), t, context)


def concat_inputs(mask, masked_latent):
    """The inpainting model's extra input channels: round(mask) on one channel, then the masked image's latent."""
    return torch.cat([mask[:, :1].round(), masked_latent], dim=1)


def composite(destination, source, x, y, mask=None, resize_source=False):
    """ImageCompositeMasked: IMAGEs [B, H, W, C]; source (through mask, not clamped, as ComfyUI) pasted
    with its top left corner at pixel (x, y) >= 0."""
    destination, source = _alpha_fix(destination, source)
    dst, src = destination.clone().movedim(-1, 1), source.movedim(-1, 1)
    if resize_source:
        src = F.interpolate(src, size=dst.shape[-2:], mode="bilinear")
    src = repeat_to_batch(src, dst.shape[0])
    x, y = min(x, dst.shape[-1]), min(y, dst.shape[-2])
    bottom, right = y + src.shape[-2], x + src.shape[-1]
    if mask is None:
        m = torch.ones_like(src)
    else:
        m = repeat_to_batch(F.interpolate(mask_4d(mask), size=src.shape[-2:], mode="bilinear"), src.shape[0])
    visible_h, visible_w = dst.shape[-2] - y, dst.shape[-1] - x
    m = m[:, :, :visible_h, :visible_w]
    dst[..., y:bottom, x:right] = m * src[..., :visible_h, :visible_w] + (1 - m) * dst[..., y:bottom, x:right]
    return dst.movedim(1, -1)


def _alpha_fix(destination, source):
    """node_helpers.image_alpha_fix: drop the source's alpha. An RGBA destination with an RGB source is
    refused: ComfyUI 0.3.64 pads the destination to 5 channels there and fails on the paste."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        raise InputError("source", f"has {source.shape[-1]} channels and the destination {destination.shape[-1]}: "
                                   "ComfyUI's ImageCompositeMasked cannot paste it either; give both the same "
                                   "channels (an RGB destination)")
    return destination, source
