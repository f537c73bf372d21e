"""The nodes' host inside ComfyUI: its device and memory manager, progress bar and interruption.

The pack's entry (__init__.py) configures it when ComfyUI's `comfy` package is importable."""
import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..core.errors import InputError
from .host import Host, Progress


class ComfyHost(Host):
    inside_comfyui = True

    def device(self):
        return mm.get_torch_device()

    def managed(self, module):
        """Hand a module to ComfyUI's memory manager, so it is moved to the GPU when used and offloaded
        or freed with ComfyUI's other models."""
        return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device())

    def use(self, handle):
        mm.load_model_gpu(handle)
        return handle.model

    def progress(self, total):
        return _ComfyProgress(total)

    def sampler(self, function):
        """ComfyUI's SAMPLER: a KSAMPLER calls `function` with k-diffusion's signature (LDMSamplerSelect)."""
        return comfy.samplers.KSAMPLER(function)

    def run_under_model(self, model, conditioning, latent, work):
        """Through ComfyUI's own sampling path (comfy.sample.sample_custom, cfg 1: the positive only), so the
        MODEL's patches, LoRAs, memory management and extra conditions (SDXL's sizes) apply: a KSAMPLER
        whose function hands `work` the guided denoiser and the clean latent (zero noise: x = the scaled
        latent) and returns it unchanged."""
        sampling = self._scored_sampling(model)
        results = []
        batch = self._timesteps_per_call(model, latent)

        def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            results.append(work(lambda x_, sigma: model_k(x_, sigma, **(extra_args or {})), x, sampling.sigmas, batch))
            return x

        ends = torch.stack([sampling.sigma_max, sampling.sigma_min]).float()
        comfy.sample.sample_custom(model, torch.zeros_like(latent), 1.0, comfy.samplers.KSAMPLER(function), ends,
                                   conditioning, conditioning, latent, disable_pbar=True, seed=0)
        return results[0]

    def model_timesteps(self, model):
        return len(self._scored_sampling(model).sigmas)

    @staticmethod
    def _scored_sampling(model):
        """The MODEL's model_sampling, refused (naming `model`) unless the bound applies to it: a discrete DDPM
        schedule with x = x0 + sigma eps, and a model of whole images (not inpainting)."""
        sampling = model.get_model_object("model_sampling")
        if (not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
                or isinstance(sampling, comfy.model_sampling.StableCascadeSampling)
                or not isinstance(sampling, comfy.model_sampling.EPS)):
            raise InputError("model", f"its sampling ({type(sampling).__name__}) is not a discrete DDPM schedule "
                                      "with x = x0 + sigma eps (SD1.x, SD2.x, SDXL and their fine-tunes are); "
                                      "the bound needs one")
        if model.model.model_config.inpaint_model():
            raise InputError("model", "is an inpainting (or image-conditioned) model: it models the masked region "
                                      "given the rest, not whole images, so it has no likelihood of an image")
        return sampling

    @staticmethod
    def _timesteps_per_call(model, latent, most=64):
        """(image, timestep) pairs per model call: `most`, halved until core's own estimate of the call's
        memory (BaseModel.memory_required, with its 1.5 margin as in calc_cond_batch) fits the free memory
        of the model's device (an SD1.5 UNet at 512 x 512 takes far fewer than 64 at once on most GPUs)."""
        free = mm.get_free_memory(model.load_device)
        batch = most
        while batch > 1 and model.model.memory_required([batch, *latent.shape[1:]]) * 1.5 > free:
            batch //= 2
        return batch

    def encode(self, vae, image):
        ratio = vae.downscale_ratio
        height, width = image.shape[1:3]
        if not isinstance(ratio, int) or height % ratio or width % ratio:
            raise InputError("image", f"{width}x{height} is not a multiple of the VAE's factor {ratio}: resize or "
                                      "crop it (the bound of a cropped image would not be this image's)")
        return vae.encode(image[..., :3])

    def encode_text(self, clip, text):
        if clip is None:
            raise InputError("clip", "is None: the checkpoint holds no text encoder; load one with CLIPLoader")
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class _ComfyProgress(Progress):
    """ComfyUI's progress bar under the running node, with JPEG previews; honours interruption."""

    def __init__(self, total):
        super().__init__(total)
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, done, preview=None):
        mm.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, self.total, ("JPEG", preview, 512) if preview is not None else None)

    def note(self, text):
        """The bar has no text: ComfyUI's console (its log) gets it, as ComfyUI's own long steps do."""
        logging.info("[ldm_nodes] %s", text)
