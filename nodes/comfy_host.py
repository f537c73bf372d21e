"""The nodes' host inside ComfyUI: its device and memory manager, progress bar and interruption.

The pack's entry (__init__.py) configures it when ComfyUI's `comfy` package is importable."""
import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.samplers
import comfy.utils

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
