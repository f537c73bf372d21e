"""Training: the KL autoencoder, then the text encoder and denoiser with DDPM's Algorithm 1.

Stage 1 (Rombach et al. 2022, section 3.1) fits the autoencoder with a reconstruction loss and a
small KL pull of the latent posterior towards N(0, I). Stage 2 sets the latent scale factor to
1 / std of the latents (LDM appendix G), and trains the denoiser and
the text encoder jointly on L_simple (objective.py), replacing the caption by the empty prompt
some of the time so classifier-free guidance has an unconditional model to contrast with.

Data comes as a torch Dataset of uint8 images with captions (core/datasets.py: a folder decoded
lazily, or the procedural scenes), batched by a DataLoader; `--cache-latents` encodes it once through
the frozen autoencoder into a memory-mapped file instead.

Runs are resumable: every `save_every` steps the weights, the EMA weights, the optimizer state, the
random state and the loss and held-out curves are written to <out>/<stage>-state.safetensors
(safetensors, never pickle), and a run started again with the same arguments continues from there.
Under torchrun (WORLD_SIZE > 1) the modules are wrapped in DistributedDataParallel, a
DistributedSampler gives each rank its share of every global batch, every rank draws the global
batch's random numbers and keeps its own rows (`Draws`), and only rank 0 prints and writes files:
the same global batch trains the same model whatever the number of processes.
"""
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .autoencoder import AutoencoderConfig, AutoencoderKL, IdentityAutoencoder
from .errors import InputError
from .checkpoint import BUILTIN_PREFIX, load_checkpoint, read_model_metadata, save_checkpoint
from .likelihood import variational_bound
from .plot import plot_training
from .objective import l_simple
from .progress import TextProgress
from .schedule import TrainingSchedule
from .text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, tokenize_weighted
from .transformer import TransformerConfig, TransformerModel
from .unet import UNetConfig, UNetModel


@dataclass(frozen=True)
class RunOptions:
    """What every stage shares: where to write, how long, how fast, how often to report.
    batch_size is per process; under torchrun the global batch is batch_size x world size."""

    out_dir: str
    steps: int
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    seed: int = 0
    device: str = "cpu"
    save_every: int = 500
    log_every: int = 20
    workers: int = 0  # DataLoader worker processes decoding images
    flip: bool = False  # mirror each training image left-right with probability 1/2
    precision: str = "fp32"  # "bf16": the forward pass under bf16 autocast (weights and optimizer stay fp32)


# --- bookkeeping ------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of parameters, theta_ema <- d theta_ema + (1 - d) theta."""

    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module, step):
        d = min(self.decay, (1 + step) / (10 + step))  # shorter memory early on
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - d)

    def copy_to(self, module):
        module.load_state_dict({k: v.to(p.dtype) for (k, v), p in zip(self.shadow.items(), module.state_dict().values())})


class Progress:
    """Step, smoothed loss, samples per second and time left, every `every` steps, on the pack's progress line."""

    def __init__(self, label, total, batch_size, start_step, every):
        self.line, self.total, self.batch_size, self.every = TextProgress(label), total, batch_size, every
        self.start_step, self.start_time, self.loss = start_step, time.time(), None

    def update(self, step, loss):
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        if step % self.every and step != self.total:
            return
        done = step - self.start_step
        elapsed = max(time.time() - self.start_time, 1e-9)
        rate = done * self.batch_size / elapsed
        left = (self.total - step) * elapsed / max(done, 1)
        self.line.update(step, self.total, f"loss {self.loss:.5f} {rate:.1f} samples/s {left / 60:.1f} min left")
        if step == self.total:
            self.line.close()


def save_state(path, modules, optimizer, ema, step, generator, info, history):
    """Everything a run needs to continue, in one safetensors file (no pickle); `history` (the loss and
    held-out curves so far) travels in the metadata so a resumed run keeps its curves."""
    tensors = {}
    for name, module in modules.items():
        tensors.update({f"model.{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.shadow.items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    tensors["rng"] = generator.get_state()
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"step": str(step), "info": json.dumps(info), "history": json.dumps(history)})
    os.replace(tmp, path)  # a crash mid-write never leaves a broken state behind


def load_state(path, modules, optimizer, ema, generator, info):
    """Restore what save_state wrote; returns (the step to continue from, the history). Refuses a state
    written by a run with other settings (the number of steps may grow: that extends a run), and a file
    that is not a complete state, naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if not {"step", "info", "history"} <= set(metadata):
                raise InputError(path, "not a training state of this version (no step, settings or history in "
                                       "its metadata); delete it to start the stage again")
            saved, info = json.loads(metadata["info"]), json.loads(json.dumps(info))
            if saved != info:
                changed = sorted(k for k in set(saved) | set(info) if saved.get(k) != info.get(k))
                raise InputError(path, f"written by a run with other settings ({', '.join(changed)}); "
                                       "use another --out folder or the same settings")
            keys = set(f.keys())
            for name, module in modules.items():
                prefix = f"model.{name}."
                module.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)})
            for k in ema.shadow:
                ema.shadow[k] = f.get_tensor(f"ema.{k}")
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for i, p in enumerate(params):
                state = {k.split(".", 2)[2]: f.get_tensor(k).to(p.device) for k in keys if k.startswith(f"optim.{i}.")}
                if state:
                    optimizer.state[p] = state
            generator.set_state(f.get_tensor("rng"))
            return int(metadata["step"]), json.loads(metadata["history"])
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a readable training state ({error}); delete it to start the stage again") from None


def learning_rate(opts, step):
    """Linear warmup over opts.warmup steps, then a cosine decay to a tenth of opts.lr at opts.steps."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(opts.steps - opts.warmup, 1))
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def distributed():
    """(rank, world size), initialising the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def process_device(device):
    """Under torchrun, "cuda" means this process's own GPU (LOCAL_RANK): one GPU per process."""
    if device == "cuda" and distributed()[1] > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    return device


def _barrier():
    """Wait until rank 0 has written what the other ranks read next (no-op in one process)."""
    if distributed()[1] > 1:
        torch.distributed.barrier()


def _wrap(module, device, world):
    if world > 1:
        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


class Draws:
    """The random numbers of one training step. Every rank draws those of the whole global batch from one
    shared generator and keeps its own rows (rank, rank + world, ...): the positions, in the global batch,
    of the samples the DistributedSampler gives it. So a run's numbers do not depend on how many
    processes share the batch, and the generator's state is the same on every rank."""

    def __init__(self, generator, rank, world):
        self.generator, self.rank, self.world = generator, rank, world

    def _rows(self, x):
        return x[self.rank::self.world]

    def randn(self, shape):
        return self._rows(torch.randn((shape[0] * self.world, *shape[1:]), generator=self.generator))

    def rand(self, n):
        return self._rows(torch.rand(n * self.world, generator=self.generator))

    def randint(self, high, n):
        return self._rows(torch.randint(0, high, (n * self.world,), generator=self.generator))


class _Repeat(torch.utils.data.Dataset):
    """A dataset seen `times` times per epoch, so an epoch holds at least one global batch."""

    def __init__(self, dataset, times):
        self.dataset, self.times = dataset, times

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, i):
        return self.dataset[i % len(self.dataset)]


def _batches(dataset, opts, rank, world, step):
    """This rank's batches from `step` on. Epoch e is DistributedSampler's permutation for (seed, e),
    split across the ranks; a batch is batch_size of this rank's share, in order, so global batch k of
    an epoch is elements k*G..(k+1)*G-1 of the permutation (G = batch_size x world) whatever the world
    size, and a resumed run skips exactly the batches it had already used."""
    global_batch = opts.batch_size * world
    data = _Repeat(dataset, math.ceil(global_batch / len(dataset)))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=opts.seed, drop_last=True)
    per_epoch = len(sampler) // opts.batch_size
    epoch, skip = divmod(step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * opts.batch_size:per_epoch * opts.batch_size]
        yield from torch.utils.data.DataLoader(torch.utils.data.Subset(data, indices), batch_size=opts.batch_size,
                                               num_workers=opts.workers, pin_memory=opts.device.startswith("cuda"))
        epoch, skip = epoch + 1, 0


def _train_loop(label, opts, modules, loss_fn, dataset, info, ema_decay, on_save=None):
    """The shared loop: AdamW on `learning_rate`, EMA, progress, periodic resumable state.
    loss_fn(wrapped modules, batch, draws) -> loss, on this rank's share of the global batch.
    on_save(step, history) runs after each save, on rank 0, which alone writes files and prints.
    Returns the EMA and the history {"loss": [[step, smoothed loss], ...], ...}."""
    rank, world = distributed()
    device = torch.device(opts.device)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    ema_target = torch.nn.ModuleDict(modules)
    ema = EMA(ema_target, ema_decay)
    generator = torch.Generator("cpu").manual_seed(opts.seed * 1000)
    state_path = os.path.join(opts.out_dir, f"{label}-state.safetensors")
    step, history = 0, {"loss": []}
    if os.path.exists(state_path):
        step, history = load_state(state_path, modules, optimizer, ema, generator, info)
        if rank == 0:
            print(f"{label}: resuming at step {step} from {state_path}", file=sys.stderr)
    wrapped = {name: _wrap(m, device, world) for name, m in modules.items()}
    progress = Progress(label, opts.steps, opts.batch_size * world, step, opts.log_every)
    draws = Draws(generator, rank, world)
    batches = _batches(dataset, opts, rank, world, step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")
    while step < opts.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(opts, step)
        with autocast:
            loss = loss_fn(wrapped, next(batches), draws)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        ema.update(ema_target, step)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{label}: the loss became {loss.item()} at step {step}; lower --lr")
        if rank == 0:
            progress.update(step, loss.item())
            if step % opts.log_every == 0 or step == opts.steps:
                history["loss"].append([step, progress.loss])
            if step % opts.save_every == 0 or step == opts.steps:
                if on_save:
                    on_save(step, history)
                save_state(state_path, modules, optimizer, ema, step, generator, info, history)
    return ema, history


def _flip(x, draws, opts):
    """x mirrored left-right where a fair coin says so (--flip), else x."""
    if not opts.flip:
        return x
    return torch.where((draws.rand(len(x)) < 0.5).to(x.device)[:, None, None, None], x.flip(-1), x)


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
        x = _flip(_pixels(batch, device), draws, opts)
        x_hat, kl = modules["reconstruction"](x, draws.randn((len(x), *latent)))
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x) + kl_weight * kl.mean() / x[0].numel()

    info = {"stage": "autoencoder", "config": config.to_dict(), "batch_size": opts.batch_size,
            "world_size": distributed()[1], "lr": opts.lr, "seed": opts.seed, "kl_weight": kl_weight,
            "data": dataset.describe, "images": len(dataset), "resolution": dataset.resolution, "flip": opts.flip}
    modules = {"reconstruction": Reconstruction(vae)}
    ema, history = _train_loop("autoencoder", opts, modules, loss_fn, dataset, info, ema_decay)
    ema.copy_to(torch.nn.ModuleDict(modules))
    return vae.eval(), _last(history)


def _last(history):
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
        x = _flip(_pixels(batch, device), draws, opts)
        with torch.no_grad():
            posterior = vae.encode(x)
        z = posterior.mean + posterior.std * draws.randn(posterior.mean.shape).to(device)
        x_hat = modules["decoding"](z)
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)

    encoder_digest = float(sum(p.detach().double().sum() for m in encoder for p in m.parameters()))
    info = {"stage": "decoder", "config": vae.config.to_dict(), "batch_size": opts.batch_size,
            "world_size": distributed()[1], "lr": opts.lr, "seed": opts.seed, "data": dataset.describe,
            "images": len(dataset), "resolution": dataset.resolution, "flip": opts.flip,
            "encoder_digest": encoder_digest}
    decoding = Decoding(vae)
    ema, history = _train_loop("decoder", opts, {"decoding": decoding}, loss_fn, dataset, info, ema_decay)
    ema.copy_to(torch.nn.ModuleDict({"decoding": decoding}))
    return vae.eval(), _last(history)


# --- stage 2: text encoder and denoiser -------------------------------------------------------

@torch.no_grad()
def encode_dataset(vae, images, device, batch_size=256):
    """Posterior mean and std of the latents (unscaled) of uint8 images [N, 3, R, R]."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
        posterior = vae.encode(x)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
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
        """Encode `dataset` into `path` (rank 0 writes, the others wait), unless an earlier run did."""
        if distributed()[0] == 0 and not os.path.exists(path):
            device = torch.device(opts.device)
            orientations = 2 if opts.flip else 1
            shape = (len(dataset), orientations, 2, *_latent_shape(vae.config, dataset.resolution))
            tmp = f"{path}.tmp.npy"
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=opts.workers)
            for images, index in loader:
                x = images.to(device).float() / 127.5 - 1
                for k, view in enumerate((x, x.flip(-1))[:orientations]):
                    posterior = vae.encode(view)
                    array[index.numpy(), k, 0] = posterior.mean.cpu().numpy()
                    array[index.numpy(), k, 1] = posterior.std.cpu().numpy()
            array.flush()
            del array
            os.replace(tmp, path)
        _barrier()
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
        sample = torch.stack([dataset[i][0] for i in range(min(len(dataset), SCALE_SAMPLE))])
        vae.config.scale_factor = latent_scale(vae, *encode_dataset(vae, sample, device), opts.seed)
    scale = vae.config.scale_factor
    ids, empty_ids = caption_ids(dataset.captions)
    empty_ids = empty_ids.to(device)
    network, text = network.to(device), text.to(device).requires_grad_(train_text)
    vae_digest = float(sum(p.detach().double().sum() for p in vae.parameters()))
    info = {"stage": "denoiser", "family": type(network).__name__, "network": network.config.to_dict(),
            "text": text.config.to_dict(), "train_text": train_text, "schedule": schedule.config,
            "prediction": prediction, "batch_size": opts.batch_size, "world_size": distributed()[1], "lr": opts.lr,
            "seed": opts.seed, "p_uncond": p_uncond, "data": dataset.describe, "images": len(dataset),
            "resolution": dataset.resolution, "flip": opts.flip, "scale_factor": scale, "vae_digest": vae_digest}
    if not train_text:  # a shared, frozen text encoder: resuming with another one would go unnoticed
        info["text_digest"] = float(sum(p.detach().double().sum() for p in text.parameters()))
    if init:
        info["init"] = init
    if cache_latents:
        digest = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
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
            posterior = vae.encode(_flip(_pixels(batch, device), draws, opts))
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
        bound = held_out_bound(network, text, vae, schedule, prediction, *held_out)
        error = float(bound.standard_error.pow(2).mean().div(len(held_out[0])).sqrt())
        history.setdefault("held_out_bound", []).append([step, float(bound.total.mean()), error])
        history["unit"] = bound.unit
        print(f"\ndenoiser {step}: bound {bound.total.mean():.4f} +- {error:.4f} {bound.unit} "
              f"on {len(held_out[0])} held-out images", file=sys.stderr)
        write_curves(opts.out_dir, history)

    ema, history = _train_loop("denoiser", opts, modules, loss_fn, data, info, ema_decay,
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
    _write_json(path, record)
    plot_training(history).save(os.path.join(out_dir, "training.png"))


def _write_json(path, value):
    with open(f"{path}.tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(f"{path}.tmp", path)


@torch.no_grad()
def held_out_bound(network, text, vae, schedule, prediction, images, captions, timesteps=50, seed=0):
    """The variational bound (core/likelihood.py) of uint8 images under the conditioned network: bits/dim
    in pixel space, nats per latent dimension of the scaled posterior mean otherwise; a strided estimate
    with the same draws every time, so successive reports compare like with like."""
    device = next(network.parameters()).device
    x = images.to(device).float() / 127.5 - 1
    pixel = isinstance(vae, IdentityAutoencoder)
    x0 = x if pixel else vae.encode(x).mode() * vae.config.scale_factor
    context = text(caption_ids(captions)[0].to(device))
    return variational_bound(network, x0, schedule, prediction, context, discrete=pixel, timesteps=timesteps,
                             generator=torch.Generator().manual_seed(seed))


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
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp,
              metadata={"config": json.dumps(vae.config.to_dict())})
    os.replace(tmp, path)


# --- the whole recipe -------------------------------------------------------------------------

# The built-in models (models/README.md): 64x64 scenes, an f=4 autoencoder (16x16x4 latents), a
# two-layer text encoder of width 64, and either a three-level UNet with attention at 8x8 and 4x4 or a
# PixArt-style transformer over 2x2 latent patches (64 tokens). Pixel space (DDPM's setting): the
# identity autoencoder, a smaller UNet at 32x32 and DDPM's linear schedule 1e-4..0.02.
TINY_AUTOENCODER = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
TINY_TEXT = CLIPTextConfig(width=64, layers=2, heads=2, mlp_width=256)
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_levels=(1, 2), transformer_depth=1, context_dim=64, num_head_channels=32)
TINY_TRANSFORMER = TransformerConfig(in_channels=4, out_channels=4, width=192, depth=6, heads=3, context_dim=64,
                                     patch_size=2, base_size=8)
TINY_PIXEL_UNET = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                             attention_levels=(1, 2), transformer_depth=1, context_dim=64, num_head_channels=32)
TINY_SCHEDULE = TrainingSchedule("scaled_linear")
PIXEL_SCHEDULE = TrainingSchedule("linear", 1000, 1e-4, 0.02)
DENOISERS = ("unet", "transformer")


def denoiser_config(denoiser, channels, text_width, pixel=False):
    """The TINY_* config of a family, sized to the latent channels and the text width."""
    if denoiser not in DENOISERS:
        raise InputError("--denoiser", f"unknown {denoiser!r}; choose one of {', '.join(DENOISERS)}")
    config = TINY_TRANSFORMER if denoiser == "transformer" else TINY_PIXEL_UNET if pixel else TINY_UNET
    return replace(config, in_channels=channels, out_channels=channels, context_dim=text_width)


NETWORKS = {UNetConfig: UNetModel, TransformerConfig: TransformerModel}


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
    need = (NETWORKS[type(config)].__name__, config.in_channels, config.context_dim)
    if have != need:
        raise InputError(f"--init {init.name}", f"its denoiser is a {have[0]} for {have[1]}-channel inputs and "
                                                f"{have[2]}-wide text; this run needs a {need[0]} for {need[1]} and {need[2]}")
    return network.train().requires_grad_(True)  # the loader hands out frozen modules for inference


def check_resolution(resolution, vae, network):
    """The image size must be a multiple of the autoencoder's factor times the denoiser's own downsampling."""
    inner = (2 ** (len(network.config.channel_mult) - 1) if isinstance(network.config, UNetConfig)
             else network.config.patch_size)
    multiple = vae.config.f * inner
    if resolution % multiple:
        raise InputError("--resolution", f"{resolution} is not a multiple of {multiple} (the autoencoder's factor "
                                         f"{vae.config.f} x the denoiser's downsampling {inner})")


def checkpoint_blocks(network):
    """Gradient checkpointing: each UNet block (each transformer block) recomputes its activations in the
    backward pass instead of keeping them, trading compute for memory. The state dict is unchanged."""
    blocks = ([*network.input_blocks, network.middle_block, *network.output_blocks]
              if isinstance(network, UNetModel) else list(network.blocks))
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(block).forward.__get__(block),
                                          use_reentrant=False)


def _reuse_or_train(path, label, train):
    """A stage's autoencoder from `path` when an earlier run finished it (loss None), else train() and
    save its result there (rank 0; the others wait for the file)."""
    rank = distributed()[0]
    if os.path.exists(path):
        if rank == 0:
            print(f"{label}: using {path}", file=sys.stderr)
        return load_autoencoder(path), None
    vae, loss = train()
    if rank == 0:
        save_autoencoder(path, vae)
    _barrier()
    return vae, loss


def _autoencoder(recipe, dataset):
    """Stage 1 and the optional decoder fine-tune, each reused from <out> when already done.
    Returns (vae, final autoencoder loss, final decoder loss); losses are None for reused stages."""
    opts = recipe.options(recipe.vae_steps, recipe.vae_batch_size, recipe.vae_lr)
    vae, vae_loss = _reuse_or_train(os.path.join(recipe.out_dir, "autoencoder.safetensors"), "autoencoder",
                                    lambda: train_autoencoder(opts, TINY_AUTOENCODER, dataset))
    decoder_loss = None
    if recipe.decoder_steps:
        stage1, opts = vae, recipe.options(recipe.decoder_steps, recipe.vae_batch_size, recipe.vae_lr)
        vae, decoder_loss = _reuse_or_train(os.path.join(recipe.out_dir, "autoencoder-decoder.safetensors"), "decoder",
                                            lambda: finetune_decoder(opts, stage1, dataset))
    return vae, vae_loss, decoder_loss


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
    models that do not fit, a resolution they cannot take, a saved state in <out> that is not one."""
    for stage in STAGES:
        path = os.path.join(recipe.out_dir, f"{stage}-state.safetensors")
        if os.path.exists(path):
            try:
                with safe_open(path, framework="pt") as f:
                    complete = {"step", "info", "history"} <= set(f.metadata() or {})
            except (OSError, SafetensorError) as error:
                raise InputError(path, f"not a readable training state ({error}); delete it to start the stage "
                                       "again") from None
            if not complete:
                raise InputError(path, "not a training state of this version (no step, settings or history in its "
                                       "metadata); delete it to start the stage again")
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
    network = trained_network(recipe.init, config) if recipe.init else NETWORKS[type(config)](config)
    check_resolution(resolution, vae or AutoencoderKL(TINY_AUTOENCODER), network)
    text = copy.deepcopy(base_ck.text_encoder).float() if base_ck else CLIPTextModel(TINY_TEXT)
    schedule = PIXEL_SCHEDULE if recipe.pixel else TINY_SCHEDULE
    return Parts(network, text, vae, schedule, recipe.prediction or "eps", base_ck, False)


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
    vae_loss = decoder_loss = None
    if vae is None:
        vae, vae_loss, decoder_loss = _autoencoder(recipe, dataset)
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
        if recipe.base and recipe.base.name.startswith(BUILTIN_PREFIX):
            parts_from = {"text": recipe.base.name} if recipe.pixel else {"text": recipe.base.name, "vae": recipe.base.name}
        record = {**(data_record or {}), "data": dataset.describe, "images": len(dataset),
                  "held_out": len(held_out[0]) if held_out else 0, "resolution": dataset.resolution,
                  "denoiser": recipe.denoiser, "pixel": recipe.pixel,
                  "base": recipe.base.name if recipe.base else None}
        if whole:
            record.update(fine_tune=WHOLE_MODEL, train_text=recipe.train_text)
        if recipe.init:
            record["init"] = {"model": recipe.init.name, "training": read_model_metadata(recipe.init.path).get("training")}
        if own_autoencoder:  # the autoencoder stages ran here
            record.update(vae_steps=recipe.vae_steps, vae_batch_size=recipe.vae_batch_size, vae_lr=recipe.vae_lr,
                          decoder_steps=recipe.decoder_steps, final_autoencoder_loss=vae_loss,
                          final_decoder_loss=decoder_loss)
        world = distributed()[1]
        record.update(steps=recipe.steps, batch_size=recipe.batch_size, world_size=world,
                      global_batch_size=recipe.batch_size * world, lr=recipe.lr, seed=recipe.seed, flip=recipe.flip,
                      device=recipe.device, precision=recipe.precision, final_denoiser_loss=_last(history),
                      wall_time_s_this_run=round(time.time() - started), curves=history)
        save_model(path, network, vae, text, schedule, prediction, record, parts_from)
        _write_json(os.path.join(recipe.out_dir, "record.json"), record)
    _barrier()
    return path
