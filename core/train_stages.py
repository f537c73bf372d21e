"""The two stages of latent diffusion training (Rombach et al. 2022), on the engine of train_loop.py.

Stage 1 (section 3.1) fits the autoencoder with a reconstruction loss and a small KL pull of the
latent posterior towards N(0, I), and may fine-tune its decoder alone. Stage 2 sets the latent scale
factor to 1 / std of the latents (appendix G) and trains the denoiser and the text encoder jointly on
L_simple (DDPM Algorithm 1, objective.py), replacing the caption by the empty prompt some of the
time so classifier-free guidance has an unconditional model to contrast with.
"""
import hashlib
import json
import os
import sys
from dataclasses import fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .autoencoder import AutoencoderConfig, AutoencoderKL, IdentityAutoencoder
from .checkpoint import save_checkpoint
from .errors import InputError
from .files import written_whole
from .likelihood import variational_bound
from .objective import l_simple
from .plot import plot_training
from .progress import TextProgress
from .stops import ignore_stop_signals
from .text import CLIPTokenizer, tokenize_weighted
from .train_loop import barrier, distributed, flip, run_stage


# --- stage 1: the autoencoder ----------------------------------------------------------------

class Reconstruction(torch.nn.Module):
    """x -> (x_hat, KL) through the autoencoder: a forward() for DistributedDataParallel to wrap.
    noise: the standard normal draws of z = mean + std * noise."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, noise):
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.mean + posterior.std * noise.to(x.device, x.dtype)), posterior.kl()


def _pixels(batch, device):
    """uint8 images [B, 3, R, R] of a DataLoader batch -> float in [-1, 1] on the device."""
    return batch[0].to(device).float() / 127.5 - 1


def _latent_shape(config, resolution):
    return (config.embed_dim, resolution // config.f, resolution // config.f)


def train_autoencoder(opts, config, dataset, kl_weight=1e-6, ema_decay=0.999):
    """Fit the KL autoencoder on a dataset of uint8 images [3, R, R]: L1 + L2 reconstruction of x in
    [-1, 1] plus kl_weight * KL(q(z|x) || N(0, I)) per pixel. Returns the EMA autoencoder and its last loss."""
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    vae = AutoencoderKL(config).to(device)
    latent = _latent_shape(config, dataset.resolution)

    def loss_fn(modules, batch, draws):
        x = flip(_pixels(batch, device), draws, opts)
        x_hat, kl = modules["reconstruction"](x, draws.randn((len(x), *latent)))
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x) + kl_weight * kl.mean() / x[0].numel()

    info = {"stage": "autoencoder", "config": config.to_dict(), "batch_size": opts.batch_size,
            "world_size": distributed()[1], "lr": opts.lr, "seed": opts.seed, "kl_weight": kl_weight,
            "data": dataset.describe, "images": len(dataset), "resolution": dataset.resolution, "flip": opts.flip}
    modules = {"reconstruction": Reconstruction(vae)}
    ema, history = run_stage("autoencoder", opts, modules, loss_fn, dataset, info, ema_decay)
    ema.copy_to(torch.nn.ModuleDict(modules))
    return vae.eval(), last_value(history)


def parameter_digest(*modules):
    """SHA-256 of the modules' parameters (each one's name, dtype, shape and bytes, in order), as
    "sha256:<hex>": a fingerprint in a stage's settings, so a resume notices that a part the stage keeps
    frozen (an encoder, an autoencoder, a text encoder) changed, even by a permutation or by edits that
    cancel in a sum. (States saved before this stored a float sum; load_state refuses them by name.)"""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{i}.{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def last_value(history):
    return history["loss"][-1][1] if history["loss"] else None


class Decoding(torch.nn.Module):
    """z -> x_hat through the decoder half only: the parameters a decoder fine-tune updates."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


def finetune_decoder(opts, vae, dataset, ema_decay=0.999):
    """Stage 1b: train the decoder alone on latents of the frozen encoder, with the same L1 + L2
    reconstruction loss (as Stable Diffusion's ft-EMA/ft-MSE decoders were). The encoder, hence every
    latent and the scale factor, stays exactly as it was: a denoiser trained on it stays valid, so
    this can run before or after stage 2. Returns the autoencoder with the EMA decoder and its last loss."""
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    vae = vae.to(device)
    encoder = [vae.encoder, vae.quant_conv]
    for module in encoder:
        module.requires_grad_(False)

    def loss_fn(modules, batch, draws):
        x = flip(_pixels(batch, device), draws, opts)
        with torch.no_grad():
            posterior = vae.encode(x)
        z = posterior.mean + posterior.std * draws.randn(posterior.mean.shape).to(device)
        x_hat = modules["decoding"](z)
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)

    encoder_digest = parameter_digest(*encoder)
    info = {"stage": "decoder", "config": vae.config.to_dict(), "batch_size": opts.batch_size,
            "world_size": distributed()[1], "lr": opts.lr, "seed": opts.seed, "data": dataset.describe,
            "images": len(dataset), "resolution": dataset.resolution, "flip": opts.flip,
            "encoder_digest": encoder_digest}
    decoding = Decoding(vae)
    ema, history = run_stage("decoder", opts, {"decoding": decoding}, loss_fn, dataset, info, ema_decay)
    ema.copy_to(torch.nn.ModuleDict({"decoding": decoding}))
    return vae.eval(), last_value(history)


# --- stage 2: text encoder and denoiser -------------------------------------------------------

def _first_images(dataset, count):
    """uint8 [n, 3, R, R]: the first `count` images of a dataset (all of a smaller one)."""
    return torch.stack([dataset[i][0] for i in range(min(len(dataset), count))])


@torch.no_grad()
def encode_dataset(vae, images, device, batch_size=64, progress=None):
    """Posterior mean and std of the latents (unscaled) of uint8 images [N, 3, R, R]; progress: a
    TextProgress told of each batch when there are several (and closed), or None."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
        posterior = vae.encode(x)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        if progress and len(images) > batch_size:
            progress.update(min(i + batch_size, len(images)), len(images), "images encoded")
    if progress:
        progress.close()
    return torch.cat(means), torch.cat(stds)


class LatentCache(torch.utils.data.Dataset):
    """The posterior mean and std of every image's latent (and of its mirror image with `flip`), computed
    once by the frozen autoencoder into a .npy file in the run folder and read back memory-mapped, so
    memory stays flat however many images there are. Items: (float [F, 2, C, h, w], index), F = 2
    orientations with flip (mirrored second) else 1, then mean and std."""

    def __init__(self, path):
        self.path, self._array = path, None
        self._length = np.load(path, mmap_mode="r").shape[0]

    def __len__(self):
        return self._length

    def __getitem__(self, i):
        if self._array is None:  # opened in each DataLoader worker, never pickled
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[i])), i

    @staticmethod
    @torch.no_grad()
    def build(path, vae, dataset, opts):
        """Encode `dataset` into `path` (rank 0 writes, the others wait), unless an earlier run did; the
        caches of other settings in the same folder are removed (they would only take space)."""
        if distributed()[0] == 0 and not os.path.exists(path):
            folder = os.path.dirname(path)
            for name in os.listdir(folder):
                if name.startswith("latents-") and name.endswith(".npy"):
                    os.remove(os.path.join(folder, name))
            device = torch.device(opts.device)
            orientations = 2 if opts.flip else 1
            shape = (len(dataset), orientations, 2, *_latent_shape(vae.config, dataset.resolution))
            line = TextProgress("caching latents")
            with written_whole(path, ".tmp.npy") as tmp:
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=opts.workers,
                                                     worker_init_fn=ignore_stop_signals)
                for images, index in loader:
                    x = images.to(device).float() / 127.5 - 1
                    for k, view in enumerate((x, x.flip(-1))[:orientations]):
                        posterior = vae.encode(view)
                        array[index.numpy(), k, 0] = posterior.mean.cpu().numpy()
                        array[index.numpy(), k, 1] = posterior.std.cpu().numpy()
                    line.update(int(index[-1]) + 1, len(dataset), f"images encoded into {path}")
                array.flush()
                del array
            line.close()
        barrier()
        return LatentCache(path)


def caption_ids(captions, tokenizer=None):
    """Token ids [N, 77] of single-chunk captions, and the empty prompt's [77]."""
    tokenizer = tokenizer or CLIPTokenizer()
    rows = []
    for text in captions + [""]:
        ids, _ = tokenize_weighted(tokenizer, text)
        if len(ids) != 1:
            raise ValueError(f"caption longer than 75 tokens: {text!r}")
        rows.append(ids[0])
    ids = torch.stack(rows)
    return ids[:-1], ids[-1]


def latent_scale(vae, mean, std, seed):
    """The latent scale factor: 1 / std of sampled latents (LDM appendix G); 1 in pixel space, where
    DDPM's data already spans [-1, 1]."""
    if isinstance(vae, IdentityAutoencoder):
        return 1.0
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return round(1.0 / float((mean + std * noise).std()), 5)


SCALE_SAMPLE = 512  # images whose latents set the scale factor


def train_denoiser(opts, vae, network, text, dataset, schedule, prediction="eps", p_uncond=0.1, ema_decay=0.9995,
                   train_text=True, fit_scale=True, held_out=None, init=None, cache_latents=False):
    """Algorithm 1 on latents z = scale * (mean + std * n) of the frozen autoencoder (z = x in pixel
    space), for either denoiser family; the text encoder is trained jointly unless train_text is False
    (a shared or frozen one). A caption is replaced by the empty prompt with probability p_uncond.
    dataset: uint8 images [3, R, R] with their `captions`; cache_latents: encode them once into
    <out>/latents-*.npy (`LatentCache`) instead of at every step.
    fit_scale: set the autoencoder's scale factor from the latents of up to SCALE_SAMPLE images; False
    keeps a shared one's. held_out: (uint8 images, captions) scored by the variational bound
    (`held_out_bound`) at every save, kept in the history and drawn with the loss in <out>/training.png.
    init: the name of the trained model the network starts from, if any (a resume with another is refused).
    Returns (network, text encoder, vae with its scale factor set), with EMA weights, and the history."""
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    if fit_scale:
        vae.config.scale_factor = latent_scale(vae, *encode_dataset(vae, _first_images(dataset, SCALE_SAMPLE), device,
                                                                    progress=TextProgress("fitting the scale")),
                                               opts.seed)
    scale = vae.config.scale_factor
    ids, empty_ids = caption_ids(dataset.captions)
    empty_ids = empty_ids.to(device)
    network, text = network.to(device), text.to(device).requires_grad_(train_text)
    vae_digest = parameter_digest(vae)
    info = {"stage": "denoiser", "family": type(network).__name__, "network": network.config.to_dict(),
            "text": text.config.to_dict(), "train_text": train_text, "schedule": schedule.config,
            "prediction": prediction, "batch_size": opts.batch_size, "world_size": distributed()[1], "lr": opts.lr,
            "seed": opts.seed, "p_uncond": p_uncond, "data": dataset.describe, "images": len(dataset),
            "resolution": dataset.resolution, "flip": opts.flip, "scale_factor": scale, "vae_digest": vae_digest}
    if not train_text:  # a shared, frozen text encoder: resuming with another one would go unnoticed
        info["text_digest"] = parameter_digest(text)
    if init:
        info["init"] = init
    if cache_latents:  # named by what the latents depend on: a new batch size or lr reuses them
        depends = {k: info[k] for k in ("data", "images", "resolution", "flip", "vae_digest")}
        digest = hashlib.sha1(json.dumps(depends, sort_keys=True).encode()).hexdigest()[:12]
        data = LatentCache.build(os.path.join(opts.out_dir, f"latents-{digest}.npy"), vae, dataset, opts)
    else:
        data = dataset

    def latents(batch, draws):
        """The posterior (mean, std) of this rank's images, from the cache or encoded now."""
        if cache_latents:
            cached = batch[0].to(device)  # [B, orientations, 2, C, h, w]
            pick = (draws.rand(len(cached)) < 0.5).long() if opts.flip else torch.zeros(len(cached), dtype=torch.long)
            cached = cached[torch.arange(len(cached)), pick.to(device)]
            return cached[:, 0], cached[:, 1]
        with torch.no_grad():
            posterior = vae.encode(flip(_pixels(batch, device), draws, opts))
        return posterior.mean, posterior.std

    def loss_fn(modules, batch, draws):
        mean, std = latents(batch, draws)
        b = len(mean)
        z0 = scale * (mean + std * draws.randn(mean.shape).to(device))
        drop = (draws.rand(b) < p_uncond).to(device)
        tokens = torch.where(drop[:, None], empty_ids[None], ids[batch[1]].to(device))
        with torch.set_grad_enabled(train_text):
            context = (modules["text"] if train_text else text)(tokens)
        t, eps = draws.randint(schedule.num_timesteps, b), draws.randn(z0.shape)
        return l_simple(modules["network"], z0, schedule, prediction, context, t=t, eps=eps)

    modules = {"network": network, "text": text} if train_text else {"network": network}

    def report(step, history):
        bound = held_out_bound(network, text, vae, schedule, prediction, *held_out, batch_size=opts.batch_size)
        error = float(bound.standard_error.pow(2).mean().div(len(held_out[0])).sqrt())
        history.setdefault("held_out_bound", []).append([step, float(bound.total.mean()), error])
        history["unit"] = bound.unit
        print(f"\ndenoiser {step}: bound {bound.total.mean():.4f} +- {error:.4f} {bound.unit} on "
              f"{len(held_out[0])} held-out images (+-: one standard error of its estimate from "
              f"{HELD_OUT_TIMESTEPS} random timesteps per image; more --val makes it smaller)", file=sys.stderr)
        write_curves(opts.out_dir, history)

    ema, history = run_stage("denoiser", opts, modules, loss_fn, data, info, ema_decay,
                               report if held_out else lambda step, history: write_curves(opts.out_dir, history))
    ema.copy_to(torch.nn.ModuleDict(modules))
    return network.eval(), text.eval(), vae, history


def write_curves(out_dir, history):
    """The loss and held-out curves so far: under "curves" in <out>/record.json and drawn in <out>/training.png."""
    path = os.path.join(out_dir, "record.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    record["curves"] = history
    write_json(path, record)
    plot_training(history).save(os.path.join(out_dir, "training.png"))


def write_json(path, value):
    with written_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=2)


HELD_OUT_TIMESTEPS = 50  # timesteps per held-out image in the bound's strided estimate


@torch.no_grad()
def held_out_bound(network, text, vae, schedule, prediction, images, captions, timesteps=HELD_OUT_TIMESTEPS, seed=0,
                   batch_size=64):
    """The variational bound (core/likelihood.py) of uint8 images under the conditioned network: bits/dim
    in pixel space, nats per latent dimension of the scaled posterior mean otherwise; a strided estimate
    with the same draws every time, so successive reports compare like with like. Images go through in
    groups of `batch_size` (memory stays that of one group), with a progress line when there are several."""
    device = next(network.parameters()).device
    pixel = isinstance(vae, IdentityAutoencoder)
    ids = caption_ids(captions)[0]
    generator = torch.Generator().manual_seed(seed)
    line = TextProgress("held-out bound") if len(images) > batch_size else None
    bounds = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
        x0 = x if pixel else vae.encode(x).mode() * vae.config.scale_factor
        context = text(ids[i:i + batch_size].to(device))
        bounds.append(variational_bound(network, x0, schedule, prediction, context, discrete=pixel,
                                        timesteps=timesteps, generator=generator))
        if line:
            line.update(min(i + batch_size, len(images)), len(images), "held-out images scored")
    if line:
        line.close()
    return replace(bounds[0], **{f.name: torch.cat([getattr(b, f.name) for b in bounds]) for f in fields(bounds[0])
                                 if isinstance(getattr(bounds[0], f.name), torch.Tensor)})


def save_model(path, network, vae, text, schedule, prediction, record, parts_from=None):
    """The shipped file: fp16 weights in our checkpoint format, the training record in its metadata."""
    save_checkpoint(path, network, vae, text, schedule, prediction, dtype=torch.float16, extra={"training": record},
                    parts_from=parts_from)


def load_autoencoder(path):
    """The stage-1 result written by `save_autoencoder`; InputError naming the file when it is broken."""
    try:
        with safe_open(path, framework="pt") as f:
            config = AutoencoderConfig.from_dict(json.loads((f.metadata() or {})["config"]))
            vae = AutoencoderKL(config)
            vae.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    except (OSError, SafetensorError, RuntimeError, KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"not a readable autoencoder ({error}); delete it to train the stage again") from None
    return vae.eval()


def save_autoencoder(path, vae):
    with written_whole(path) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp,
                  metadata={"config": json.dumps(vae.config.to_dict())})
