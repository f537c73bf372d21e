"""What the nodes need from their host, inside ComfyUI or in the headless runner.

Inside ComfyUI (its `comfy` package importable): the torch device and memory manager of
comfy.model_management, ProgressBar with preview images, and interruption. In the runner: the
device given by --device and the runner's text progress bar. Nothing here computes anything.
"""
import torch

try:  # inside ComfyUI
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
except ImportError:
    mm = None


def in_comfyui():
    return mm is not None


def device():
    """The device models run on."""
    if mm is not None:
        return mm.get_torch_device()
    from .. import runner
    return torch.device(runner.device())


def managed(module):
    """Hand a module to ComfyUI's memory manager, so it is moved to the GPU when used and offloaded
    or freed with ComfyUI's other models; outside ComfyUI the module is returned as it is."""
    if mm is None:
        return module
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def use(handle):
    """The module behind a `managed` handle, loaded onto the device for use."""
    if mm is None:
        return handle
    mm.load_model_gpu(handle)
    return handle.model


class Progress:
    """Step progress for a node: ComfyUI's progress bar (with a preview image), or the runner's."""

    def __init__(self, total):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total) if mm is not None else None

    def update(self, done, preview=None):
        if self.bar is not None:
            mm.throw_exception_if_processing_interrupted()
            self.bar.update_absolute(done, self.total, ("JPEG", preview, 512) if preview is not None else None)
        else:
            from .. import runner
            runner.progress(done, self.total)
