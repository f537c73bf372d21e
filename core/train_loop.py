"""The training engine every stage runs on: AdamW with warmup and cosine decay, EMA weights,
resumable states, batches from a DataLoader (DistributedSampler under torchrun), and progress.

Runs are resumable: every `save_every` steps the weights, the EMA weights, the optimizer state, the
random state and the loss and held-out curves are written to <out>/<stage>-state.safetensors
(safetensors, never pickle), and a run started again with the same arguments continues from there.
Under torchrun (WORLD_SIZE > 1) the modules are wrapped in DistributedDataParallel, a
DistributedSampler gives each rank its share of every global batch, every rank draws the global
batch's random numbers and keeps its own rows (`Draws`), and only rank 0 prints and writes files:
the same global batch trains the same model whatever the number of processes.

Ctrl-C or SIGTERM during a stage (one process) finishes the step under way, saves the state at that
step and raises `Interrupted`; a second one stops at once. Every file is written under a temporary
name and renamed (`written_whole`), so neither a signal nor a full disk leaves a partial file behind.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import InputError
from .files import written_whole
from .progress import TextProgress
from .stops import Interrupted, deferred_stops, ignore_stop_signals, stop_requested


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
    """Exponential moving average of parameters, theta_ema <- d theta_ema + (1 - d) theta.

    By hand rather than torch.optim.swa_utils.AveragedModel: the shadow is a plain fp32 state dict that
    the safetensors training state saves as it is (AveragedModel keeps a deep copy of the module, in its
    dtype, with a counter buffer of its own), and the warm-up of the decay is one line."""

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
    """Step, smoothed loss, samples per second and time left, every `every` steps, on the pack's progress line.
    loss: the smoothed loss a resumed run had reached, so the curve goes on where it stopped."""

    def __init__(self, label, total, batch_size, start_step, every, loss=None):
        self.line, self.total, self.batch_size, self.every = TextProgress(label), total, batch_size, every
        self.start_step, self.start_time, self.loss = start_step, time.time(), loss

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
    with written_whole(path) as tmp:
        save_file(tensors, tmp, metadata={"step": str(step), "info": json.dumps(info), "history": json.dumps(history)})


def state_metadata(path):
    """The metadata of the training state file `path`; InputError naming it when it is not a readable,
    complete state (no step, settings or history)."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise InputError(path, f"not a readable training state ({error}); delete it to start the stage again") from None
    if not {"step", "info", "history"} <= set(metadata):
        raise InputError(path, "not a training state of this version (no step, settings or history in its "
                               "metadata); delete it to start the stage again")
    return metadata


def load_state(path, modules, optimizer, ema, generator, info):
    """Restore what save_state wrote; returns (the step to continue from, the history). Refuses a state
    written by a run with other settings (the number of steps may grow: that extends a run), and a file
    that is not a complete state, naming it."""
    metadata = state_metadata(path)
    try:
        with safe_open(path, framework="pt") as f:
            saved, info = json.loads(metadata["info"]), json.loads(json.dumps(info))
            if saved != info:
                changed = sorted(k for k in set(saved) | set(info) if saved.get(k) != info.get(k))
                old_digests = [k for k in changed if isinstance(saved.get(k), float) and k.endswith("_digest")]
                if old_digests:  # before issue 25 the frozen parts' fingerprint was a float sum
                    raise InputError(path, f"written by an older version of the trainer ({', '.join(old_digests)} "
                                           "is the old float sum, which cannot be checked against the frozen parts "
                                           "now); delete it to start the stage again")
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
    """Linear warmup over opts.warmup steps, then a cosine decay to a tenth of opts.lr at opts.steps.

    A function of the step rather than a LambdaLR: a resumed run sets the rate from its step alone,
    with no scheduler state to save and restore."""
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


def barrier():
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
                                               num_workers=opts.workers, pin_memory=opts.device.startswith("cuda"),
                                               worker_init_fn=ignore_stop_signals)
        epoch, skip = epoch + 1, 0


def run_stage(label, opts, modules, loss_fn, dataset, info, ema_decay, on_save=None):
    """The shared loop: AdamW on `learning_rate`, EMA, progress, periodic resumable state.
    loss_fn(wrapped modules, batch, draws) -> loss, on this rank's share of the global batch.
    on_save(step, history) runs before each save, on rank 0, which alone writes files and prints.
    Returns the EMA and the history {"loss": [[step, smoothed loss], ...], "wall_time_s": the stage's
    time over every run, "smoothed_loss": the last one, ...}. Raises Interrupted after a stop request."""
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
    started, spent, saved = time.time(), history.get("wall_time_s", 0), step
    wrapped = {name: _wrap(m, device, world) for name, m in modules.items()}
    progress = Progress(label, opts.steps, opts.batch_size * world, step, opts.log_every, history.get("smoothed_loss"))
    draws = Draws(generator, rank, world)
    batches = _batches(dataset, opts, rank, world, step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")
    with deferred_stops():
        while step < opts.steps:
            if stop_requested():
                if rank == 0 and saved != step:
                    _save(label, opts, state_path, modules, optimizer, ema, step, generator, info, history, progress,
                          round(spent + time.time() - started, 1), None)
                raise Interrupted(label, step, opts.steps, state_path)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(opts, step)
            try:
                with autocast:
                    loss = loss_fn(wrapped, next(batches), draws)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except RuntimeError as error:
                if not _out_of_memory(error):
                    raise
                raise InputError(BATCH_FLAGS[label], f"{opts.batch_size} ran out of memory at step {step + 1} of the "
                                                     f"{label} stage; lower it (the run resumes from its last saved "
                                                     "state)") from None
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
                    _save(label, opts, state_path, modules, optimizer, ema, step, generator, info, history, progress,
                          round(spent + time.time() - started, 1), on_save)
                    saved = step
    return ema, history


def _save(label, opts, path, modules, optimizer, ema, step, generator, info, history, progress, wall_time, on_save):
    """The state at `step` (after on_save's report), saying so while the file is written; the history keeps
    the smoothed loss and the stage's time over every run, so a resumed run goes on from both."""
    history.update(wall_time_s=wall_time, smoothed_loss=progress.loss)
    if on_save:
        on_save(step, history)
    line = TextProgress(f"{label} state")
    line.update(step, opts.steps, f"saving {path}")
    save_state(path, modules, optimizer, ema, step, generator, info, history)
    line.close()


BATCH_FLAGS = {"autoencoder": "--vae-batch-size", "decoder": "--vae-batch-size", "denoiser": "--batch-size"}


def _out_of_memory(error):
    """A failed allocation: torch.OutOfMemoryError on accelerators, a RuntimeError from the CPU allocator."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def flip(x, draws, opts):
    """x mirrored left-right where a fair coin says so (--flip), else x."""
    if not opts.flip:
        return x
    return torch.where((draws.rand(len(x)) < 0.5).to(x.device)[:, None, None, None], x.flip(-1), x)
