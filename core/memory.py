"""Peak memory of encoding, sampling and decoding, estimated from shapes before anything is allocated.

`estimate_peak(stage, module, shape, ...)` is the estimator; `check_fits(...)` compares it with the
memory available on the module's device (RAM on the CPU: the tightest of MemAvailable, the
process's address-space limit and the cgroup's memory limit (v2 or v1), each less what is in use;
free device memory plus torch's cached blocks on CUDA) and refuses with an InputError that names width, height and batch_size and shows the estimate against what is available. The nodes
call it just before the large allocations (encode, sample, decode), never after.

The model of a forward pass in inference mode: at any moment memory holds the pass's persistent
tensors (its input and output, the UNet's skip connections) plus the working set of the one layer
that runs, and the peak is the largest such sum. Working sets, for B images of C channels over P
positions and s bytes per element (the module's dtype):
  convolution level  footprint.CONV_LIVE * B * C * P * s: the input, its normalisation and activation, the
                     convolution's output and the residual sum (C: the widest tensor at that size)
  attention          q, k, v, the output and the residual (5 * B * P * C * s) plus the scores and
                     their softmax, 2 * B * heads * chunk * M * s, where chunk is the number of
                     queries per call that core/attention.py picks (all P, or fewer for long
                     sequences, so this term is bounded by 2 * attention.CHUNK_BYTES; CUDA's fused
                     kernels hold no scores, so there it is an over-estimate of at most that much)
  feed-forward       the hidden layer: 3 * B * P * hidden * s (projection, activation, product)
Sampling runs the network on 2B images (the conditional and unconditional halves of guidance in
one call). The autoencoder's stages are tiled above TILE_ABOVE latent pixels a side
(core/autoencoder.py), and then their working set is that of one tile. The constants were fitted
against measured peaks on the CPU (tests/test_bad_inputs.py holds the estimate within a factor of
2 of the measured peak at three sizes); the estimate is for refusing what cannot fit, not for
accounting.
"""
import math
from pathlib import Path

import torch

from .autoencoder import TILE, TILE_ABOVE, AutoencoderKL, placement
from .errors import InputError
from .families import family_of
from .footprint import attention_bytes, conv_bytes

CONTEXT_TOKENS = 77  # one chunk of the prompt


def estimate_peak(stage, module, shape, f=1, context_tokens=CONTEXT_TOKENS):
    """Estimated peak bytes of `stage` on `module`, from shapes alone.

    stage "encode": module an autoencoder, shape the IMAGE's [B, H, W, 3].
    stage "decode": module an autoencoder, shape the latent's [B, C, h, w].
    stage "sample": module the denoising network (UNetModel or TransformerModel), shape the
    latent's [B, C, h, w]; context_tokens: the prompt's length (77 per chunk).
    f: the autoencoder's downsampling factor (only "sample" uses it: nothing else scales with it)."""
    s = torch.finfo(placement(module)[1]).bits // 8
    if stage == "encode":
        b, height, width, _ = shape
        image = 3 * b * 3 * height * width * 4  # IMAGE, channels-first and scaled to [-1, 1]
        return image + _autoencoder_peak(module, b, height, width, s, decoder=False)
    if stage == "decode":
        b, _, h, w = shape
        f = module.config.f
        image = 3 * b * 3 * h * w * f * f * 4  # the decoded batch, as float32, then as IMAGE
        return image + _autoencoder_peak(module, b, h * f, w * f, s, decoder=True)
    if stage == "sample":
        b, c, h, w = shape
        state = 6 * b * c * h * w * 4  # the sampler's x, denoised, noise and history, in float32
        return state + family_of(module).activation_peak(module.config, 2 * b, h, w, s, context_tokens)
    raise ValueError(f"unknown stage {stage!r}")


def _autoencoder_peak(module, b, height, width, s, decoder):
    """The encoder's or decoder's largest working set, over one tile when the stage is tiled."""
    if not isinstance(module, AutoencoderKL):  # the identity: no network
        return 0
    config = module.config
    f = config.f
    if max(height, width) > TILE_ABOVE * f:
        height, width = min(height, TILE * f), min(width, TILE * f)
    widths = [config.ch * m for m in config.ch_mult]
    phases = []
    for i, c in enumerate(widths):
        positions = math.ceil(height / 2**i) * math.ceil(width / 2**i)
        # the widest tensor at this size: the encoder's level input, or what the decoder upsamples into it
        neighbour = widths[min(i + 1, len(widths) - 1)] if decoder else widths[max(i - 1, 0)]
        phases.append(conv_bytes(b, max(c, neighbour), positions, s))
        if i in config.attn_levels or i == len(widths) - 1:  # the mid block attends at the lowest size
            phases.append(attention_bytes(b, 1, positions, positions, c, s))
    return max(phases)


def available_memory(device):
    """(bytes available for a new allocation on `device`, where that figure comes from), or (None, why)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory on {device}"
    if device.type != "cpu":
        return None, f"no memory figure for {device.type}"
    figures = []
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        if "MemAvailable" in fields:
            figures.append((int(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable"))
    figures += _process_limits()
    if not figures:
        try:
            import psutil
        except ImportError:
            return None, "no memory figure on this system"
        figures.append((psutil.virtual_memory().available, "available RAM"))
    available, source = min(figures)
    return available, f"RAM ({source})"


CGROUP_LIMITS = (  # (limit, usage) files: cgroup v2, then v1's memory controller
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _process_limits():
    """[(bytes left under a limit on this process, which limit)]: the address-space rlimit (prlimit, ulimit -v)
    less the address space in use, and the cgroup's memory limit less its usage (a container's)."""
    figures = []
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        status = Path("/proc/self/status")
        if soft != resource.RLIM_INFINITY and status.exists():
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            used = int(fields["VmSize"].split()[0]) * 1024 if "VmSize" in fields else 0
            figures.append((max(soft - used, 0), "the process's address-space limit (RLIMIT_AS)"))
    except (ImportError, OSError, ValueError):  # no resource module (Windows) or no /proc
        pass
    for limit, usage in CGROUP_LIMITS:
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and used.isdigit() and int(cap) < 2**60:  # v1 writes a huge number for "no limit"
            figures.append((max(int(cap) - int(used), 0), "the container's memory limit"))
            break
    return figures


def check_fits(stage, module, shape, f=1, context_tokens=CONTEXT_TOKENS):
    """Refuse `stage` before it allocates when its estimated peak exceeds the memory available on the
    module's device: InputError naming width, height and batch_size, with both figures."""
    problem = shortfall(estimate_peak(stage, module, shape, f, context_tokens), placement(module)[0])
    if problem is None:
        return
    if stage == "encode":
        batch, height, width = shape[0], shape[1], shape[2]
    else:
        scale = module.config.f if stage == "decode" else f
        batch, height, width = shape[0], shape[2] * scale, shape[3] * scale
    verb = {"encode": "encoding", "decode": "decoding", "sample": "sampling"}[stage]
    raise InputError("width, height, batch_size", f"{width} x {height} at batch_size {batch}: {verb} {problem}; "
                                                  "make the image or the batch smaller")


def shortfall(need, device):
    """None when `need` bytes fit in the memory available on `device` (or nothing says how much that is),
    else "needs about X GiB and Y GiB is available (where Y comes from)" for a refusal's message."""
    available, source = available_memory(device)
    if available is None or need <= available:
        return None
    return f"needs about {_gib(need)} and {_gib(available)} is available ({source})"


def _gib(n):
    return f"{n / 2**30:.2f} GiB"
