"""LDMLoadModel: a single-file checkpoint -> model, text encoder, autoencoder."""
import logging
import os
import weakref
from dataclasses import dataclass, replace

import torch

from . import model_paths
from ..core.accel import cpu_has_bf16
from ..core.checkpoint import load_checkpoint
from ..core.pipeline import DiffusionModel, TextEncoder
from ..core.preview import decoded_preview, fit_latent_to_rgb, latent_preview, preview_method, sd1_latent_to_rgb
from ..core.text import CLIPTokenizer
from . import host

PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Loaded:
    """One part of a loaded model as it travels between nodes: the core object, the handle the
    host's memory manager moves around, and the model's name."""

    core: object
    handle: object
    name: str

    def get(self):
        """The core object, with its module on the device."""
        host.use(self.handle)
        return self.core


@dataclass
class LoadedModel(Loaded):
    vae: object = None  # the model's autoencoder part, for previews
    _latent_to_rgb: dict = None  # preview method -> its linear map, made once

    def previewer(self, latent_shape):
        """A function from an unscaled latent batch to the preview image of its first latent, the size of
        the decoded image (core/preview.py chooses how). Call it before sampling: it loads the autoencoder."""
        vae = self.vae.get()
        method = preview_method(vae, latent_shape)
        if method == "decode":
            return lambda latent: decoded_preview(vae, latent)
        self._latent_to_rgb = self._latent_to_rgb or {}
        if method not in self._latent_to_rgb:
            self._latent_to_rgb[method] = sd1_latent_to_rgb() if method == "sd1" else fit_latent_to_rgb(vae)
        latent_to_rgb = self._latent_to_rgb[method]
        return lambda latent: latent_preview(latent, latent_to_rgb, vae.config.f)


def precision_dtypes(precision, device):
    """(dtype, vae dtype). auto keeps the autoencoder in fp32 and runs the rest in fp16 on a GPU; on the
    CPU in bf16 where it has bf16 instructions (core/accel.cpu_has_bf16: the built-in models' 20-step
    images then differ from fp32 by 0.1 to 0.7 / 255 on average, bench/RESULTS.md), else in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if torch.device(device).type != "cpu":
            return torch.float16, torch.float32
        return (torch.bfloat16 if cpu_has_bf16() else torch.float32), torch.float32
    return _DTYPES[precision], _DTYPES[precision]


# Loaded models stay shared while anything (ComfyUI's output cache, a running graph) holds them:
# (key, part index) -> part, held weakly, so the returned parts themselves keep their entries alive.
_cache = weakref.WeakValueDictionary()


def load_model(ckpt_name, precision):
    path = model_paths.resolve_model(ckpt_name)
    device = host.device()
    dtype, vae_dtype = precision_dtypes(precision, device)
    if precision == "auto":
        logging.getLogger(__name__).info("LDMLoadModel: precision auto is %s (autoencoder %s) on %s", dtype, vae_dtype,
                                         device)
    key = (str(path), os.path.getmtime(path), dtype, vae_dtype, str(device))
    parts = tuple(_cache.get((key, i)) for i in range(3))
    if any(part is None for part in parts):
        ck = load_checkpoint(path, dtype=dtype, vae_dtype=vae_dtype, device="cpu" if host.in_comfyui() else device)
        vae = Loaded(ck.vae, host.managed(ck.vae), ckpt_name)
        model = LoadedModel(DiffusionModel.from_checkpoint(ck), host.managed(ck.denoiser), ckpt_name, vae)
        text = Loaded(TextEncoder(ck.text_encoder, CLIPTokenizer()), host.managed(ck.text_encoder), ckpt_name)
        parts = (model, text, vae)
        for i, part in enumerate(parts):
            _cache[(key, i)] = part
    return parts


class LDMLoadModel:
    DESCRIPTION = ("Loads a latent diffusion checkpoint (.safetensors: this pack's built-in models, or a "
                   "Stable Diffusion 1.x file from models/ldm or models/checkpoints) and splits it into the "
                   "denoising model, the CLIP text encoder and the KL autoencoder (VAE).")
    CATEGORY = "latent diffusion"
    FUNCTION = "load"
    RETURN_TYPES = ("LDM_MODEL", "LDM_TEXT_ENCODER", "LDM_VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The denoising UNet with its training noise schedule and prediction type.",
                       "The CLIP text encoder and its tokenizer.",
                       "The KL autoencoder that maps images to latents and back.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (model_paths.list_models(), {
                "tooltip": "Model file. builtin/ models ship with the pack; others come from models/ldm and "
                           "models/checkpoints. Only .safetensors files are read (pickles are refused)."}),
            "precision": (PRECISIONS, {
                "default": "auto",
                "tooltip": "Weights' precision. auto: on a GPU fp16, with the autoencoder in fp32 (fp16 "
                           "autoencoders can overflow into black images); on the CPU bf16 with the autoencoder "
                           "in fp32 where the CPU has bf16 instructions (avx512_bf16, AMX), else fp32."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name):
        """ckpt_name is checked by resolving it, instead of against the list: the same names inside ComfyUI,
        and on the command line (`run`) also a model file's own path, such as a training run's."""
        try:
            model_paths.resolve_model(ckpt_name)
        except ValueError as error:
            return str(error)
        return True

    def load(self, ckpt_name, precision):
        return load_model(ckpt_name, precision)


class LDMCompileModel:
    DESCRIPTION = ("CPU only: the model, sampled from its denoiser compiled ahead of time for this CPU (torch's "
                   "AOTInductor; about 1.7x faster per step for the built-in models). The first run at each latent "
                   "size, batch, prompt length and precision builds the compiled network: about 40 s for a small "
                   "model on two cores, and it needs a C++ compiler (without one the model samples as usual and "
                   "the console says why). Builds are kept in ~/.cache/ldm-nodes/compiled, so later runs load "
                   "them at once. The same weights: nothing is loaded twice. On a GPU it changes nothing.")
    CATEGORY = "latent diffusion"
    FUNCTION = "compile"
    RETURN_TYPES = ("LDM_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model; LDMSample runs its compiled denoiser on the CPU.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("LDM_MODEL", {"tooltip": "From LDMLoadModel."})}}

    def compile(self, model):
        return (replace(model, core=replace(model.core, compile=True)),)
