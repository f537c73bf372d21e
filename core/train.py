"""Training a whole model: the recipe from the command line, its checks, and the stages in order.

Stage 1 fits the autoencoder, stage 2 the text encoder and denoiser with DDPM's Algorithm 1
(train_stages.py), both on the resumable engine of train_loop.py. Data comes as a torch Dataset of
uint8 images with captions (core/datasets.py: a folder decoded lazily, or the procedural scenes),
batched by a DataLoader; `--cache-latents` encodes it once through the frozen autoencoder into a
memory-mapped file instead. A run started again with the same arguments resumes.
"""
import copy
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from .autoencoder import AutoencoderConfig, AutoencoderKL, IdentityAutoencoder
from .checkpoint import can_provide_parts, load_checkpoint, read_model_metadata
from .errors import InputError
from .families import FAMILIES, family_of
from .memory import estimate_peak, shortfall
from .progress import TextProgress
from .meta import empty_modules
from .schedule import TrainingSchedule
from .text import CLIPTextConfig, CLIPTextModel
from .train_loop import RunOptions, barrier, distributed, state_metadata
from .train_stages import (
    finetune_decoder, last_value, load_autoencoder, save_autoencoder, save_model, train_autoencoder, train_denoiser,
    write_json,
)
from .unet import UNetConfig


# --- the whole recipe -------------------------------------------------------------------------

# The built-in models (models/README.md): 64x64 scenes, an f=4 autoencoder (16x16x4 latents), a
# two-layer text encoder of width 64, and a denoiser of the family's own built-in size (core/families.py:
# a three-level UNet, or a PixArt-style transformer over 2x2 latent patches). Pixel space (DDPM's setting): the
# identity autoencoder, a smaller UNet at 32x32 and DDPM's linear schedule 1e-4..0.02.
TINY_AUTOENCODER = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
TINY_TEXT = CLIPTextConfig(width=64, layers=2, heads=2, mlp_width=256)
TINY_PIXEL_UNET = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                             attention_levels=(1, 2), transformer_depth=1, context_dim=64, num_head_channels=32)
TINY_SCHEDULE = TrainingSchedule("scaled_linear")
PIXEL_SCHEDULE = TrainingSchedule("linear", 1000, 1e-4, 0.02)


def denoiser_config(denoiser, channels, text_width, pixel=False):
    """The family's built-in size (core/families.py; the pixel UNet for --pixel), sized to the latent
    channels and the text width."""
    if denoiser not in FAMILIES:
        raise InputError("--denoiser", f"unknown {denoiser!r}; choose one of {', '.join(FAMILIES)}")
    config = TINY_PIXEL_UNET if pixel and denoiser == "unet" else FAMILIES[denoiser].tiny
    return replace(config, in_channels=channels, out_channels=channels, context_dim=text_width)


WHOLE_MODEL = "whole model"  # the record's "fine_tune" value of a run that fine-tuned a whole SD1.x-layout file


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line: the file, and the name the user gave (kept in records)."""

    path: object
    name: str


@dataclass(frozen=True)
class Recipe:
    """Every setting of a `train` run, by name: the command line builds one, `train_model` reads it.
    batch sizes are per process (the global batch is batch x world size under torchrun).
    base: a model whose text encoder (frozen) and autoencoder (unless pixel) are reused.
    init: a model the denoiser starts from; a Stable Diffusion 1.x-layout file (`is_whole_model`) is
    fine-tuned whole instead: its UNet, its text encoder with train_text, its autoencoder frozen."""

    out_dir: str
    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-4
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    decoder_steps: int = 0
    prediction: str = None  # None: eps, or the --init model's own
    seed: int = 0
    device: str = "cpu"
    save_every: int = 250
    denoiser: str = "unet"
    pixel: bool = False
    base: ModelRef = None
    init: ModelRef = None
    train_text: bool = False
    flip: bool = False
    cache_latents: bool = False
    workers: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def options(self, steps, batch_size, lr):
        return RunOptions(self.out_dir, steps, batch_size, lr, seed=self.seed, device=self.device,
                          save_every=self.save_every, workers=self.workers, flip=self.flip, precision=self.precision)


def is_whole_model(path):
    """A file to fine-tune whole: one without our metadata (a Stable Diffusion 1.x checkpoint) or one
    that such a fine-tune wrote."""
    metadata = read_model_metadata(path)
    return not metadata or metadata.get("training", {}).get("fine_tune") == WHOLE_MODEL


def trained_network(init, config):
    """The denoiser of the trained model `init` (a ModelRef), to fine-tune it or give it more steps.
    Its family, latent channels and context width must be those of `config`, the run's own."""
    network = load_checkpoint(init.path).denoiser
    have = (type(network).__name__, network.config.in_channels, network.config.context_dim)
    need = (family_of(config).network.__name__, config.in_channels, config.context_dim)
    if have != need:
        raise InputError(f"--init {init.name}", f"its denoiser is a {have[0]} for {have[1]}-channel inputs and "
                                                f"{have[2]}-wide text; this run needs a {need[0]} for {need[1]} and {need[2]}")
    return network.train().requires_grad_(True)  # the loader hands out frozen modules for inference


def check_resolution(resolution, vae, network):
    """The image size must be a multiple of the autoencoder's factor times the denoiser's own downsampling."""
    inner = family_of(network).downsampling(network.config)
    multiple = vae.config.f * inner
    if resolution % multiple:
        raise InputError("--resolution", f"{resolution} is not a multiple of {multiple} (the autoencoder's factor "
                                         f"{vae.config.f} x the denoiser's downsampling {inner})")


def checkpoint_blocks(network):
    """Gradient checkpointing: each UNet block (each transformer block) recomputes its activations in the
    backward pass instead of keeping them, trading compute for memory. The state dict is unchanged."""
    for block in family_of(network).blocks(network):
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(block).forward.__get__(block),
                                          use_reentrant=False)


def _reuse_or_train(path, label, train):
    """A stage's autoencoder from `path` when an earlier run finished it, else train() and save its
    result there (rank 0; the others wait for the file). Its losses stay in its state (stage_histories)."""
    rank = distributed()[0]
    if os.path.exists(path):
        if rank == 0:
            print(f"{label}: using {path}", file=sys.stderr)
        return load_autoencoder(path)
    vae, _ = train()
    if rank == 0:
        line = TextProgress(f"{label} saving")
        line.update(0, 1, f"writing {path}")
        save_autoencoder(path, vae)
        line.close()
    barrier()
    return vae


def _autoencoder(recipe, dataset):
    """Stage 1 and the optional decoder fine-tune, each reused from <out> when already done."""
    opts = recipe.options(recipe.vae_steps, recipe.vae_batch_size, recipe.vae_lr)
    vae = _reuse_or_train(os.path.join(recipe.out_dir, "autoencoder.safetensors"), "autoencoder",
                          lambda: train_autoencoder(opts, TINY_AUTOENCODER, dataset))
    if recipe.decoder_steps:
        stage1, opts = vae, recipe.options(recipe.decoder_steps, recipe.vae_batch_size, recipe.vae_lr)
        vae = _reuse_or_train(os.path.join(recipe.out_dir, "autoencoder-decoder.safetensors"), "decoder",
                              lambda: finetune_decoder(opts, stage1, dataset))
    return vae


@dataclass
class Parts:
    """What a run starts from, built by `prepare` before any data is read."""

    network: torch.nn.Module
    text: torch.nn.Module
    vae: torch.nn.Module  # None: stage 1 trains it
    schedule: TrainingSchedule
    prediction: str
    base: object  # the --base Checkpoint, or None
    whole: bool  # a whole-model fine-tune of an SD1.x-layout --init


STAGES = ("autoencoder", "decoder", "denoiser")


def prepare(recipe, resolution):
    """The Parts of a run, every misfit refused (InputError) before any data is read or anything is written:
    models that do not fit, a resolution they cannot take, a saved state in <out> that is not one, a batch
    size whose forward pass alone exceeds the memory available."""
    parts = _parts(recipe, resolution)
    check_batches_fit(recipe, resolution, parts)
    return parts


def check_batches_fit(recipe, resolution, parts):
    """Refuse --batch-size (and --vae-batch-size when stage 1 runs) when one forward pass, estimated as for
    inference by core/memory.py, exceeds the memory available: a floor for a training step, whose
    backward pass keeps more, so nothing that could fit is refused."""
    vae = parts.vae
    if vae is None:  # stage 1's autoencoder, for its shape alone: built on meta, no memory, no random draws
        with empty_modules():
            vae = AutoencoderKL(TINY_AUTOENCODER)
    f, latent = vae.config.f, resolution // vae.config.f
    needs = [("--batch-size", recipe.batch_size,
              estimate_peak("sample", parts.network, (recipe.batch_size, vae.config.embed_dim, latent, latent), f))]
    if parts.vae is None:
        needs.append(("--vae-batch-size", recipe.vae_batch_size,
                      estimate_peak("encode", vae, (recipe.vae_batch_size, resolution, resolution, 3))))
    for flag, batch, need in needs:
        problem = shortfall(need, recipe.device)
        if problem:
            raise InputError(flag, f"{batch} at {resolution} x {resolution}: one forward pass alone {problem}; lower it")


def _parts(recipe, resolution):
    for stage in STAGES:
        path = os.path.join(recipe.out_dir, f"{stage}-state.safetensors")
        if os.path.exists(path):
            state_metadata(path)
    for name in ("autoencoder.safetensors", "autoencoder-decoder.safetensors"):  # finished stages: read them now
        if os.path.exists(os.path.join(recipe.out_dir, name)):
            load_autoencoder(os.path.join(recipe.out_dir, name))
    if recipe.init and is_whole_model(recipe.init.path):
        for flag, used in (("--base", recipe.base), ("--pixel", recipe.pixel), ("--denoiser", recipe.denoiser != "unet")):
            if used:
                raise InputError(flag, f"cannot be combined with --init {recipe.init.name}, a Stable Diffusion "
                                       "1.x-layout file that brings its own UNet, text encoder and autoencoder")
        ck = load_checkpoint(recipe.init.path)
        if recipe.prediction not in (None, ck.prediction):
            raise InputError("--prediction", f"{recipe.prediction}, but {recipe.init.name} predicts {ck.prediction}")
        network = ck.denoiser.train().requires_grad_(True)
        text = ck.text_encoder.float().train(recipe.train_text)
        check_resolution(resolution, ck.vae, network)
        return Parts(network, text, ck.vae.float(), ck.schedule, ck.prediction, None, True)
    if recipe.train_text:
        raise InputError("--train-text-encoder", "only for fine-tuning a Stable Diffusion 1.x-layout file (--init)")
    base_ck = load_checkpoint(recipe.base.path) if recipe.base else None
    vae = IdentityAutoencoder() if recipe.pixel else base_ck.vae.float() if base_ck else None
    channels = TINY_AUTOENCODER.embed_dim if vae is None else vae.config.embed_dim
    text_width = base_ck.text_encoder.config.width if base_ck else TINY_TEXT.width
    config = denoiser_config(recipe.denoiser, channels, text_width, recipe.pixel)
    torch.manual_seed(recipe.seed)
    network = trained_network(recipe.init, config) if recipe.init else family_of(config).network(config)
    check_resolution(resolution, vae or AutoencoderKL(TINY_AUTOENCODER), network)
    text = copy.deepcopy(base_ck.text_encoder).float() if base_ck else CLIPTextModel(TINY_TEXT)
    schedule = PIXEL_SCHEDULE if recipe.pixel else TINY_SCHEDULE
    return Parts(network, text, vae, schedule, recipe.prediction or "eps", base_ck, False)


def stage_histories(out_dir):
    """{stage: its history (loss curve, time over every run)} from the stage states in <out>: a run that
    resumed, or reused a finished autoencoder, still records every stage."""
    histories = {}
    for stage in STAGES:
        path = os.path.join(out_dir, f"{stage}-state.safetensors")
        if os.path.exists(path):
            histories[stage] = json.loads(state_metadata(path)["history"])
    return histories


def train_model(recipe, dataset, held_out=None, data_record=None, parts=None):
    """The whole recipe (a Recipe) on a dataset of uint8 images with captions (core/datasets.py); writes
    <out>/model.safetensors, each stage resuming from its saved state. Returns the model's path.

    The autoencoder is stage 1 (<out>/autoencoder.safetensors; autoencoder-decoder.safetensors after
    the decoder fine-tune when decoder_steps > 0), or the identity when `pixel`, or taken from `base`
    or from a whole-model `init`. When base is builtin/<file>, the result holds only the new parts and
    refers to the built-in file for the rest (ARCHITECTURE section 5), else it holds copies. A whole-model
    init (a Stable Diffusion 1.x-layout file) gives a file in the same SD1.x key layout.
    held_out: (uint8 images, captions) whose variational bound is reported at every save and kept as a
    curve. data_record: what to record about the data (e.g. the procedural data seed). parts: what
    `prepare` gave for this recipe, when the caller checked it before reading the data.
    The record keeps an init model's own training record, so a model trained in several runs says so.
    """
    started, rank = time.time(), distributed()[0]
    parts = parts or prepare(recipe, dataset.resolution)
    network, text, vae, schedule, prediction, base_ck, whole = (parts.network, parts.text, parts.vae, parts.schedule,
                                                                parts.prediction, parts.base, parts.whole)
    own_autoencoder = vae is None
    if vae is None:
        vae = _autoencoder(recipe, dataset)
    if recipe.gradient_checkpointing:
        checkpoint_blocks(network)
    opts = recipe.options(recipe.steps, recipe.batch_size, recipe.lr)
    network, text, vae, history = train_denoiser(
        opts, vae.to(recipe.device), network, text, dataset, schedule, prediction,
        train_text=recipe.train_text if whole else base_ck is None, fit_scale=not (whole or base_ck or recipe.pixel),
        held_out=held_out, init=recipe.init.name if recipe.init else None, cache_latents=recipe.cache_latents)
    path = os.path.join(recipe.out_dir, "model.safetensors")
    if rank == 0:
        parts_from = {}
        if recipe.base and can_provide_parts(recipe.base.name):
            parts_from = {"text": recipe.base.name} if recipe.pixel else {"text": recipe.base.name, "vae": recipe.base.name}
        record = {**(data_record or {}), "data": dataset.describe, "images": len(dataset),
                  "held_out": len(held_out[0]) if held_out else 0, "resolution": dataset.resolution,
                  "denoiser": recipe.denoiser, "pixel": recipe.pixel,
                  "base": recipe.base.name if recipe.base else None}
        if whole:
            record.update(fine_tune=WHOLE_MODEL, train_text=recipe.train_text)
        if recipe.init:
            record["init"] = {"model": recipe.init.name, "training": read_model_metadata(recipe.init.path).get("training")}
        if own_autoencoder:  # the autoencoder stages ran here, in this run or an earlier one
            record.update(vae_steps=recipe.vae_steps, vae_batch_size=recipe.vae_batch_size, vae_lr=recipe.vae_lr,
                          decoder_steps=recipe.decoder_steps)
        stages = stage_histories(recipe.out_dir)
        for stage in ("autoencoder", "decoder"):
            if stage in stages:
                record.update({f"final_{stage}_loss": last_value(stages[stage]), f"{stage}_curves": stages[stage]})
        world = distributed()[1]
        record.update(steps=recipe.steps, batch_size=recipe.batch_size, world_size=world,
                      global_batch_size=recipe.batch_size * world, lr=recipe.lr, seed=recipe.seed, flip=recipe.flip,
                      device=recipe.device, precision=recipe.precision, final_denoiser_loss=last_value(history),
                      wall_time_s_this_run=round(time.time() - started),
                      training_time_s=round(sum(h.get("wall_time_s", 0) for h in stages.values())), curves=history)
        line = TextProgress("model saving")
        line.update(0, 1, f"writing {path}")
        save_model(path, network, vae, text, schedule, prediction, record, parts_from)
        line.close()
        write_json(os.path.join(recipe.out_dir, "record.json"), record)
    barrier()
    return path
