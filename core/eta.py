"""How long one network call on a large latent will take, estimated before the first one runs, so
that a long run says so from its first seconds.

The floating-point operations of one call are c0 + c1 P + c2 P^2 in its P = h * w latent positions:
convolutions, feed-forward layers and cross-attention grow with P, self-attention with P^2 (exactly so
for sizes that halve evenly through the network). torch's FlopCounterMode counts three small trial
calls, TRIAL_SIDES latent pixels a side, which fix c0, c1 and c2; the device's speed is operations
over the measured time of one call at the last trial's size, or larger until a call takes
TIMED_AT_LEAST (on a GPU small calls are launch-bound). It tells the user what to expect, it is not
for accounting: with the built-in model on a CPU it was 1% off at a 128 x 128 latent and 30% short at
256 x 256, where long attention runs slower per operation than in the trials.
"""
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

TRIAL_SIDES = (8, 16, 32)
ESTIMATE_ABOVE = 96 * 96  # latent positions; smaller runs are short, and the trials would cost more than they tell
TIMED_AT_LEAST = 0.2  # seconds: a timed call shorter than this is mostly overhead


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


# torch counts the CUDA attention kernels but not the CPU one (2.x): count it as they are counted
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
EXTRA_COUNTS = {_CPU_ATTENTION: _cpu_attention_flops} if _CPU_ATTENTION is not None else {}


def fitted_flops(call, batch, channels, device="cpu", dtype=torch.float32):
    """The operations of call(x) for x [batch, channels, h, w] as a function of h * w, fitted from the
    trial calls."""
    positions, counts = [], []
    for side in TRIAL_SIDES:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_COUNTS) as counter:
            call(torch.zeros(batch, channels, side, side, device=device, dtype=dtype))
        positions.append(side * side)
        counts.append(counter.get_total_flops())
    powers = torch.tensor([[p**k for k in range(3)] for p in positions], dtype=torch.float64)
    c = torch.linalg.solve(powers, torch.tensor(counts, dtype=torch.float64)).tolist()
    return lambda p: c[0] + c[1] * p + c[2] * p * p


def call_seconds(call, batch, channels, height, width, device="cpu", dtype=torch.float32):
    """Estimated seconds of call(x) for x [batch, channels, height, width]; None for a latent of at most
    ESTIMATE_ABOVE positions (no trials are run). The speed is timed on a square latent from the last
    trial's side, doubled while a call takes under TIMED_AT_LEAST (a GPU's small calls are launch-bound)."""
    if height * width <= ESTIMATE_ABOVE:
        return None
    flops = fitted_flops(call, batch, channels, device, dtype)
    side = TRIAL_SIDES[-1]
    while True:
        seconds = _timed(call, torch.zeros(batch, channels, side, side, device=device, dtype=dtype))
        if seconds >= TIMED_AT_LEAST or (2 * side) ** 2 > height * width:
            return seconds * flops(height * width) / max(flops(side * side), 1)
        side *= 2


def _timed(call, x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    call(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def duration(seconds):
    """'40 s', '12 min', '3.5 h' or '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
