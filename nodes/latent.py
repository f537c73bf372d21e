"""LDMEmptyLatent, LDMEncodeImage, LDMDecodeLatent: between images and the autoencoder's latents."""
from ..core.memory import check_fits
from ..core.pipeline import decode_latent, empty_latent, encode_image, encode_masked_image
from . import host


class LDMEmptyLatent:
    DESCRIPTION = "An empty (all-zero) latent batch of the size the autoencoder maps to width x height images."
    CATEGORY = "latent diffusion"
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros [batch, channels, height / f, width / f] (ComfyUI's LATENT).",)

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 64, "min": 8, "max": 4096, "step": 8}
        return {"required": {
            "vae": ("LDM_VAE", {"tooltip": "The autoencoder that sets the latent's channels and downsampling f."}),
            "width": ("INT", {**size, "tooltip": "Image width in pixels, a multiple of the autoencoder's f."}),
            "height": ("INT", {**size, "tooltip": "Image height in pixels, a multiple of the autoencoder's f."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per batch."}),
        }}

    def make(self, vae, width, height, batch_size):
        return ({"samples": empty_latent(vae.core, width, height, batch_size)},)


class LDMEncodeImage:
    DESCRIPTION = ("Encodes images to latents with the autoencoder (the posterior mean, so the same image gives "
                   "the same latent): the start of image-to-image with LDMSample's denoise below 1. With a mask, "
                   "the latent carries it as ComfyUI's noise_mask: LDMSample then repaints only the masked "
                   "region (inpainting), as core's VAEEncodeForInpaint, but the image itself is kept.")
    CATEGORY = "latent diffusion"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The images' latents (unscaled, as ComfyUI keeps them), with the noise_mask when a mask is "
                       "given.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LDM_VAE", {"tooltip": "The autoencoder from LDMLoadModel."}),
            "image": ("IMAGE", {"tooltip": "Images whose sides are multiples of the autoencoder's f."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "What to repaint (1) and keep (0), e.g. LoadImage's MASK (drawn in its mask "
                                         "editor, or a PNG's transparent pixels). A mask of another size is resized "
                                         "to the image (bilinear, as ComfyUI does), then rounded; values outside "
                                         "0..1 are clamped."}),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1,
                                     "tooltip": "Dilate the mask by this many pixels (a square of ones, as "
                                                "VAEEncodeForInpaint) so the repainted region blends in."}),
        }}

    def encode(self, vae, image, mask=None, grow_mask_by=6):
        core = vae.get()
        check_fits("encode", core, image.shape)
        if mask is None:
            return ({"samples": encode_image(core, image, progress=host.late_progress())},)
        samples, noise_mask, masked_latent = encode_masked_image(core, image, mask, grow_mask_by)
        return ({"samples": samples, "noise_mask": noise_mask, "masked_latent": masked_latent},)


class LDMDecodeLatent:
    DESCRIPTION = "Decodes latents to images with the autoencoder (tiled for large images)."
    CATEGORY = "latent diffusion"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Images [batch, height, width, 3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LDM_VAE", {"tooltip": "The autoencoder from LDMLoadModel."}),
            "samples": ("LATENT", {"tooltip": "Latents from LDMSample or LDMEncodeImage."}),
        }}

    def decode(self, vae, samples):
        core = vae.get()
        check_fits("decode", core, samples["samples"].shape)
        return (decode_latent(core, samples["samples"], progress=host.late_progress()),)
