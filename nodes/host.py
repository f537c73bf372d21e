"""What the nodes need from their host: a device, memory management, progress and interruption, and
the host's own SAMPLER object.

The nodes call the functions below and never ask who the host is. The layer above configures it
once with `configure(host)`: ComfyUI's entry with `comfy_host.ComfyHost` (ComfyUI's device, memory
manager, progress bar with previews and interruption), the headless runner with its own `Host`
(the --device it was given, its text progress line). Until then this base `Host` serves: modules
stay where they are put, on the CPU, and progress is silent. Nothing here computes anything, and
nodes/ imports neither ComfyUI nor the runner.
"""
import torch

from ..core.errors import InputError


class Host:
    """The headless host's defaults; a host overrides what it provides."""

    inside_comfyui = False  # ComfyUI's host: previews are shown, modules are loaded by its memory manager

    def device(self):
        """The device models run on."""
        return torch.device("cpu")

    def managed(self, module):
        """A handle for `module` that the host may move between devices (here: the module itself)."""
        return module

    def use(self, handle):
        """The module behind a `managed` handle, loaded onto the device for use."""
        return handle

    def progress(self, total):
        """A progress report for a node about to take `total` steps (here: silent)."""
        return Progress(total)

    def sampler(self, function):
        """The host's SAMPLER object for a k-diffusion sampling function (here: the function itself)."""
        return function

    def run_under_model(self, model, conditioning, latent, work):
        """work(denoise, x0, sigmas, batch) under the host's own diffusion model (ComfyUI's MODEL with its
        CONDITIONING): denoise(x, sigma) -> x0 the model's k-diffusion denoiser with that conditioning, x0 the
        model's scaled `latent`, sigmas its discrete training sigmas, batch how many samples one call of
        denoise may take (from the host's memory). Returns what work returns. This host has no models of
        its own."""
        raise InputError("model", "a ComfyUI MODEL exists only inside ComfyUI; headless, score the pack's own "
                                  "models with LDMLikelihood")

    def model_timesteps(self, model):
        """The number T of the host model's discrete training timesteps, after the checks run_under_model makes
        (the model can be scored): so a node can check its `steps` before it encodes anything."""
        return self.run_under_model(model, None, None, None)

    def encode(self, vae, image):
        """The host VAE's latent of IMAGE [B, H, W, 3] (ComfyUI's VAE.encode); this host has none."""
        raise InputError("vae", "a ComfyUI VAE exists only inside ComfyUI")

    def encode_text(self, clip, text):
        """The host text encoder's CONDITIONING of `text` (as ComfyUI's CLIPTextEncode); this host has none."""
        raise InputError("clip", "a ComfyUI CLIP exists only inside ComfyUI")


class Progress:
    """One node's progress: `update(done, preview=None)` reports `done` of `total` steps, with an
    optional preview image, and raises the host's interruption if the user asked for one."""

    def __init__(self, total):
        self.total = total

    def update(self, done, preview=None):
        pass

    def note(self, text):
        """What the node is doing and how long it expects, before its first step (here: not shown;
        headless: on the progress line; ComfyUI: its console)."""


_host = Host()


def configure(host):
    """Make `host` the one the nodes use (ComfyUI's entry and the runner call this)."""
    global _host
    _host = host


def current():
    return _host


def in_comfyui():
    return _host.inside_comfyui


def device():
    return _host.device()


def managed(module):
    return _host.managed(module)


def use(handle):
    return _host.use(handle)


def progress(total):
    """The host's progress report for a node about to take `total` steps."""
    return _host.progress(total)


def late_progress():
    """A progress(done, total) function for work whose total is known only when it starts (the
    autoencoder's tiles, the bound's network calls): the host's progress report, made at the first call."""
    made = []

    def report(done, total):
        if not made:
            made.append(progress(total))
        made[0].update(done)
    return report


def run_under_model(model, conditioning, latent, work):
    """work(denoise, x0, sigmas, batch) under the host's model: see Host.run_under_model."""
    return _host.run_under_model(model, conditioning, latent, work)


def model_timesteps(model):
    """T of the host's model, refused as run_under_model refuses it: see Host.model_timesteps."""
    return _host.model_timesteps(model)


def encode(vae, image):
    return _host.encode(vae, image)


def encode_text(clip, text):
    return _host.encode_text(clip, text)


def sampler(function):
    """The host's SAMPLER for a k-diffusion sampling function (inside ComfyUI: a comfy.samplers.KSAMPLER)."""
    return _host.sampler(function)
