"""Training: the KL autoencoder, then the text encoder and denoiser with DDPM's Algorithm 1.

Stage 1 (Rombach et al. 2022, section 3.1) fits the autoencoder with a reconstruction loss and a
small KL pull of the latent posterior towards N(0, I). Stage 2 encodes the whole dataset once,
sets the latent scale factor to 1 / std of the latents (LDM appendix G), and trains the denoiser and
the text encoder jointly on L_simple (objective.py), replacing the caption by the empty prompt
some of the time so classifier-free guidance has an unconditional model to contrast with.

Runs are resumable: every `save_every` steps the weights, the EMA weights, the optimizer state and
the random state are written to <out>/<stage>-state.safetensors (safetensors, never pickle), and a
run started again with the same arguments continues from there. Under torchrun (WORLD_SIZE > 1)
the modules are wrapped in DistributedDataParallel and each rank draws its own batches.
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .autoencoder import AutoencoderConfig, AutoencoderKL, IdentityAutoencoder
from .checkpoint import BUILTIN_PREFIX, load_checkpoint, read_model_metadata, save_checkpoint
from .likelihood import variational_bound
from .objective import l_simple
from .progress import TextProgress
from .schedule import TrainingSchedule
from .text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, tokenize_weighted
from .transformer import TransformerConfig, TransformerModel
from .unet import UNetConfig, UNetModel


@dataclass
class RunOptions:
    """What every stage shares: where to write, how long, how fast, how often to report."""

    out_dir: str
    steps: int
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    seed: int = 0
    device: str = "cpu"
    save_every: int = 500
    log_every: int = 20


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


def save_state(path, modules, optimizer, ema, step, generator, info):
    """Everything a run needs to continue, in one safetensors file (no pickle)."""
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
    save_file(tensors, tmp, metadata={"step": str(step), "info": json.dumps(info)})
    os.replace(tmp, path)  # a crash mid-write never leaves a broken state behind


def load_state(path, modules, optimizer, ema, generator, info):
    """Restore what save_state wrote; returns the step to continue from. Refuses a state written
    by a run with other settings (the number of steps may grow: that extends a run)."""
    with safe_open(path, framework="pt") as f:
        saved, info = json.loads(f.metadata()["info"]), json.loads(json.dumps(info))
        if saved != info:
            changed = sorted(k for k in set(saved) | set(info) if saved.get(k) != info.get(k))
            raise ValueError(f"{path} was written by a run with other settings ({', '.join(changed)}); "
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
        return int(f.metadata()["step"])


def learning_rate(opts, step):
    """Linear warmup over opts.warmup steps, then a cosine decay to a tenth of opts.lr at opts.steps."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(opts.steps - opts.warmup, 1))
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _distributed():
    """(rank, world size), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def _wrap(module, device, world):
    if world > 1:
        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def _train_loop(label, opts, modules, loss_fn, info, ema_decay, on_save=None):
    """The shared loop: AdamW on `learning_rate`, EMA, progress, periodic resumable state;
    on_save(step) runs after each save (rank 0)."""
    rank, world = _distributed()
    device = torch.device(opts.device)
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    ema_target = torch.nn.ModuleDict(modules)
    ema = EMA(ema_target, ema_decay)
    generator = torch.Generator("cpu").manual_seed(opts.seed * 1000 + rank)
    state_path = os.path.join(opts.out_dir, f"{label}-state.safetensors")
    step = 0
    if os.path.exists(state_path):
        step = load_state(state_path, modules, optimizer, ema, generator, info)
        if rank == 0:
            print(f"{label}: resuming at step {step} from {state_path}", file=sys.stderr)
    wrapped = {name: _wrap(m, device, world) for name, m in modules.items()}
    progress = Progress(label, opts.steps, opts.batch_size * world, step, opts.log_every)
    while step < opts.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(opts, step)
        loss = loss_fn(wrapped, generator)
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
            if step % opts.save_every == 0 or step == opts.steps:
                save_state(state_path, modules, optimizer, ema, step, generator, info)
                if on_save:
                    on_save(step)
    return ema, progress.loss


# --- stage 1: the autoencoder ----------------------------------------------------------------

class Reconstruction(torch.nn.Module):
    """x -> (x_hat, KL) through the autoencoder: a forward() for DistributedDataParallel to wrap."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, generator):
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.sample(generator)), posterior.kl()


def train_autoencoder(opts, config, images, kl_weight=1e-6, ema_decay=0.999):
    """Fit the KL autoencoder on uint8 images [N, 3, H, W]: L1 + L2 reconstruction of x in [-1, 1]
    plus kl_weight * KL(q(z|x) || N(0, I)) per pixel. Returns the EMA autoencoder and its last loss."""
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    vae = AutoencoderKL(config).to(device)
    images = images.to(device)

    def loss_fn(modules, generator):
        idx = torch.randint(0, len(images), (opts.batch_size,), generator=generator)
        x = images[idx.to(device)].float() / 127.5 - 1
        x_hat, kl = modules["reconstruction"](x, generator)
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x) + kl_weight * kl.mean() / x[0].numel()

    info = {"stage": "autoencoder", "config": config.to_dict(), "batch_size": opts.batch_size,
            "lr": opts.lr, "seed": opts.seed, "kl_weight": kl_weight, "images": len(images)}
    modules = {"reconstruction": Reconstruction(vae)}
    ema, loss = _train_loop("autoencoder", opts, modules, loss_fn, info, ema_decay)
    ema.copy_to(torch.nn.ModuleDict(modules))
    return vae.eval(), loss


class Decoding(torch.nn.Module):
    """z -> x_hat through the decoder half only: the parameters a decoder fine-tune updates."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


def finetune_decoder(opts, vae, images, ema_decay=0.999):
    """Stage 1b: train the decoder alone on latents of the frozen encoder, with the same L1 + L2
    reconstruction loss (as Stable Diffusion's ft-EMA/ft-MSE decoders were). The encoder, hence every
    latent and the scale factor, stays exactly as it was: a denoiser trained on it stays valid, so
    this can run before or after stage 2. Returns the autoencoder with the EMA decoder and its last loss."""
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    vae = vae.to(device)
    mean, std = encode_dataset(vae, images, device)
    mean, std, images = mean.to(device), std.to(device), images.to(device)

    def loss_fn(modules, generator):
        idx = torch.randint(0, len(images), (opts.batch_size,), generator=generator).to(device)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator).to(device)
        x = images[idx].float() / 127.5 - 1
        x_hat = modules["decoding"](z)
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)

    encoder_digest = float(sum(p.detach().double().sum() for p in vae.encoder.parameters()))
    info = {"stage": "decoder", "config": vae.config.to_dict(), "batch_size": opts.batch_size, "lr": opts.lr,
            "seed": opts.seed, "images": len(images), "encoder_digest": encoder_digest}
    decoding = Decoding(vae)
    ema, loss = _train_loop("decoder", opts, {"decoding": decoding}, loss_fn, info, ema_decay)
    ema.copy_to(torch.nn.ModuleDict({"decoding": decoding}))
    return vae.eval(), loss


# --- stage 2: text encoder and denoiser -------------------------------------------------------

@torch.no_grad()
def encode_dataset(vae, images, device, batch_size=256):
    """Posterior mean and std of every image's latent (unscaled), computed once."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
        posterior = vae.encode(x)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


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


def train_denoiser(opts, vae, network, text, images, captions, schedule, prediction="eps",
                   p_uncond=0.1, ema_decay=0.9995, train_text=True, fit_scale=True, held_out=None, init=None):
    """Algorithm 1 on latents z = scale * (mean + std * n) of the frozen autoencoder (z = x in pixel
    space), for either denoiser family; the text encoder is trained jointly unless train_text is False
    (a shared, frozen one). A caption is replaced by the empty prompt with probability p_uncond.
    fit_scale: set the autoencoder's scale factor from these latents; False keeps a shared one's.
    held_out: (images, captions) scored by the variational bound (`held_out_bound`) at every save.
    init: the name of the trained model the network starts from, if any (a resume with another is refused).
    Returns (network, text encoder, vae with its scale factor set), with EMA weights, and the last loss."""
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    mean, std = encode_dataset(vae, images, device)
    if fit_scale:
        vae.config.scale_factor = latent_scale(vae, mean, std, opts.seed)
    scale = vae.config.scale_factor
    mean, std = mean.to(device), std.to(device)
    ids, empty_ids = caption_ids(captions)
    ids, empty_ids = ids.to(device), empty_ids.to(device)
    network, text = network.to(device), text.to(device).requires_grad_(train_text)

    def loss_fn(modules, generator):
        idx = torch.randint(0, len(mean), (opts.batch_size,), generator=generator).to(device)
        noise = torch.randn(mean[idx].shape, generator=generator).to(device)
        z0 = scale * (mean[idx] + std[idx] * noise)
        drop = (torch.rand(opts.batch_size, generator=generator) < p_uncond).to(device)
        tokens = torch.where(drop[:, None], empty_ids[None], ids[idx])
        with torch.set_grad_enabled(train_text):
            context = (modules["text"] if train_text else text)(tokens)
        return l_simple(modules["network"], z0, schedule, prediction, context, generator)

    family = type(network).__name__
    info = {"stage": "denoiser", "family": family, "network": network.config.to_dict(), "text": text.config.to_dict(),
            "train_text": train_text, "schedule": schedule.config, "prediction": prediction,
            "batch_size": opts.batch_size, "lr": opts.lr, "seed": opts.seed, "p_uncond": p_uncond,
            "images": len(images), "resolution": images.shape[-1], "scale_factor": scale}
    if not train_text:  # a shared, frozen text encoder: resuming with another one would go unnoticed
        info["text_digest"] = float(sum(p.detach().double().sum() for p in text.parameters()))
    if init:
        info["init"] = init
    modules = {"network": network, "text": text} if train_text else {"network": network}
    bounds = []

    def report(step):
        bounds.append(held_out_bound(network, text, vae, schedule, prediction, *held_out))
        print(f"\ndenoiser {step}: bound {bounds[-1].total.mean():.4f} +- "
              f"{bounds[-1].standard_error.pow(2).mean().div(len(held_out[0])).sqrt():.4f} {bounds[-1].unit} "
              f"on {len(held_out[0])} held-out images", file=sys.stderr)

    ema, loss = _train_loop("denoiser", opts, modules, loss_fn, info, ema_decay, report if held_out else None)
    ema.copy_to(torch.nn.ModuleDict(modules))
    return network.eval(), text.eval(), vae, loss


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
    """The stage-1 result written by `save_autoencoder`."""
    with safe_open(path, framework="pt") as f:
        config = AutoencoderConfig.from_dict(json.loads(f.metadata()["config"]))
        vae = AutoencoderKL(config)
        vae.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return vae.eval()


def save_autoencoder(path, vae):
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path,
              metadata={"config": json.dumps(vae.config.to_dict())})



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
        raise ValueError(f"denoiser: unknown {denoiser!r}; choose one of {', '.join(DENOISERS)}")
    config = TINY_TRANSFORMER if denoiser == "transformer" else TINY_PIXEL_UNET if pixel else TINY_UNET
    return replace(config, in_channels=channels, out_channels=channels, context_dim=text_width)


NETWORKS = {UNetConfig: UNetModel, TransformerConfig: TransformerModel}


def trained_network(init, config):
    """The denoiser of the trained model at init = (file, name), to fine-tune it or give it more steps.
    Its family, latent channels and context width must be those of `config`, the run's own."""
    network = load_checkpoint(init[0]).denoiser
    have = (type(network).__name__, network.config.in_channels, network.config.context_dim)
    need = (NETWORKS[type(config)].__name__, config.in_channels, config.context_dim)
    if have != need:
        raise ValueError(f"--init {init[1]}: its denoiser is a {have[0]} for {have[1]}-channel inputs and "
                         f"{have[2]}-wide text; this run needs a {need[0]} for {need[1]} and {need[2]}")
    return network.train().requires_grad_(True)  # the loader hands out frozen modules for inference


def _reuse_or_train(path, label, train):
    """A stage's autoencoder from `path` when an earlier run finished it (loss None), else train() and
    save its result there."""
    if os.path.exists(path):
        print(f"{label}: using {path}", file=sys.stderr)
        return load_autoencoder(path), None
    vae, loss = train()
    if _distributed()[0] == 0:
        save_autoencoder(path, vae)
    return vae, loss


def _autoencoder(out_dir, images, vae_steps, vae_batch_size, vae_lr, decoder_steps, seed, device, save_every):
    """Stage 1 and the optional decoder fine-tune, each reused from <out> when already done.
    Returns (vae, final autoencoder loss, final decoder loss); losses are None for reused stages."""
    def opts(steps):
        return RunOptions(out_dir, steps, vae_batch_size, vae_lr, seed=seed, device=device, save_every=save_every)

    vae, vae_loss = _reuse_or_train(os.path.join(out_dir, "autoencoder.safetensors"), "autoencoder",
                                    lambda: train_autoencoder(opts(vae_steps), TINY_AUTOENCODER, images))
    decoder_loss = None
    if decoder_steps:
        stage1 = vae
        vae, decoder_loss = _reuse_or_train(os.path.join(out_dir, "autoencoder-decoder.safetensors"), "decoder",
                                            lambda: finetune_decoder(opts(decoder_steps), stage1, images))
    return vae, vae_loss, decoder_loss


def train_model(out_dir, images, captions, data_seed, vae_steps, steps, batch_size=64, vae_batch_size=16,
                lr=2e-4, vae_lr=1e-3, prediction="eps", seed=0, device="cpu", save_every=500, decoder_steps=0,
                denoiser="unet", pixel=False, base=None, held_out=None, init=None):
    """The whole recipe; writes <out>/model.safetensors, each stage resuming from its saved state.
    Returns the model's path.

    The autoencoder is stage 1 (<out>/autoencoder.safetensors; autoencoder-decoder.safetensors after
    the decoder fine-tune when decoder_steps > 0), or the identity when `pixel`, or taken from `base`.
    base: (file, name) of a trained model whose text encoder (frozen) and autoencoder (unless pixel)
    are reused; when its name is builtin/<file>, the result holds only the new parts and refers to
    the built-in file for the rest (ARCHITECTURE section 5), else it holds copies.
    held_out: (images, captions) whose variational bound is reported at every save.
    init: (file, name) of a trained model whose denoiser the run starts from (`trained_network`); the
    record keeps that model's own training record, so a model trained in several runs says so.
    """
    started, rank = time.time(), _distributed()[0]
    vae_loss = decoder_loss = None
    base_ck = load_checkpoint(base[0]) if base else None
    vae = IdentityAutoencoder() if pixel else base_ck.vae if base_ck else None
    channels = TINY_AUTOENCODER.embed_dim if vae is None else vae.config.embed_dim
    text_width = base_ck.text_encoder.config.width if base_ck else TINY_TEXT.width
    config = denoiser_config(denoiser, channels, text_width, pixel)
    start = trained_network(init, config) if init else None  # a misfit is refused before any stage runs
    if vae is None:
        vae, vae_loss, decoder_loss = _autoencoder(out_dir, images, vae_steps, vae_batch_size, vae_lr,
                                                   decoder_steps, seed, device, save_every)
    text = copy.deepcopy(base_ck.text_encoder).float() if base_ck else CLIPTextModel(TINY_TEXT)
    torch.manual_seed(seed)
    network = start if start is not None else NETWORKS[type(config)](config)
    schedule = PIXEL_SCHEDULE if pixel else TINY_SCHEDULE
    opts = RunOptions(out_dir, steps, batch_size, lr, seed=seed, device=device, save_every=save_every)
    network, text, vae, loss = train_denoiser(opts, vae.float().to(device), network, text, images, captions,
                                              schedule, prediction, train_text=base_ck is None,
                                              fit_scale=base_ck is None and not pixel, held_out=held_out,
                                              init=init[1] if init else None)
    path = os.path.join(out_dir, "model.safetensors")
    if rank == 0:
        parts_from = {}
        if base and base[1].startswith(BUILTIN_PREFIX):
            parts_from = {"text": base[1]} if pixel else {"text": base[1], "vae": base[1]}
        record = {"data_seed": data_seed, "images": len(images), "resolution": images.shape[-1],
                  "denoiser": denoiser, "pixel": pixel, "base": base[1] if base else None}
        if init:
            record["init"] = {"model": init[1], "training": read_model_metadata(init[0]).get("training")}
        if not (pixel or base_ck):  # the autoencoder stages ran here
            record.update(vae_steps=vae_steps, vae_batch_size=vae_batch_size, vae_lr=vae_lr,
                          decoder_steps=decoder_steps, final_autoencoder_loss=vae_loss, final_decoder_loss=decoder_loss)
        record.update(steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, final_denoiser_loss=loss,
                      wall_time_s_this_run=round(time.time() - started))
        save_model(path, network, vae, text, schedule, prediction, record, parts_from)
        with open(os.path.join(out_dir, "record.json"), "w") as f:
            json.dump(record, f, indent=2)
    return path
