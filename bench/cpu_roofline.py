"""The pack's CPU throughput against this machine's own best dense throughput, in one run.

    python bench/cpu_roofline.py [--repeats 20] [--skip-nll] [--cpu-time]

Prints, measured side by side in this process (torch's thread setting as the process has it: set
OMP_NUM_THREADS / OMP_WAIT_POLICY before starting it, as for the CLI):
  - dense kernels: fp32 (and bf16 when the CPU reports avx512_bf16 or amx_bf16) 3x3 convolutions at
    batch 2, NCHW and channels-last, and square matmuls; the best fp32 rate is the reference;
  - the built-in model (builtin/tiny-shapes): one UNet call as sampling makes it (fp32, and bf16 where
    the CPU has it: what precision auto picks there) (batch 2, 16x16x4 latent, context 77), one
    sampling step of dpmpp_2m with CFG ((a 41-step run - a 1-step run) / 40: the network, the sampler's
    updates, the CFG mix; fp32, and bf16 where the CPU has it; eager, and compiled as LDMCompileModel
    makes it run: core/compiled.py, whose packages this builds on its first run, about a minute
    each, kept in ~/.cache/ldm-nodes/compiled), and one timestep of the pixel model's bound (builtin/tiny-shapes-pixel on a
    32x32 image, the batch nll uses).
FLOPs come from torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions; norms, softmax and
elementwise work are not counted, so the pack's rate is a lower bound on the work it does). Times are the
best of --repeats calls after two warm-up calls, for the dense kernels and the pack alike: on a shared
machine the best is the figure least disturbed by other work. Rates are GFLOP/s; the pack's ratios are
against the best fp32 dense rate of this run.
"""
import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from ldm_nodes.core.accel import fast_network
from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.images import read_image
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, likelihood, sample
from ldm_nodes.nodes.model_paths import model_file

PACK = Path(__file__).resolve().parent.parent
CONVS = ((320, 64), (640, 32), (128, 16), (64, 16))  # (channels, side) of a 3x3 conv at batch 2
MATMULS = (1024, 2048)


def best_seconds(fn, repeats):
    """The shortest of `repeats` calls of fn() after two warm-up calls: wall time, or with --cpu-time the
    process's CPU time (the clock set in main)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


CLOCK = time.perf_counter


def packed_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
    """torch.utils.flop_counter's count for accel.PrepackedConv2d's oneDNN call, which it does not know."""
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def flops(fn):
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.mkldnn._convolution_pointwise: packed_conv_flops}) as counter:
        fn()
    return counter.get_total_flops()


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def dense_rates(dtype, repeats):
    """{kernel name: GFLOP/s} for the conv and matmul shapes in `dtype`."""
    rates = {}
    with torch.inference_mode():
        for channels, side in CONVS:
            w = torch.randn(channels, channels, 3, 3, dtype=dtype)
            x = torch.randn(2, channels, side, side, dtype=dtype)
            work = 2 * 2 * channels * channels * 9 * side * side
            for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
                xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
                seconds = best_seconds(lambda: F.conv2d(xf, wf, padding=1), repeats)
                rates[f"conv3x3 {channels}ch {side}x{side} b2 {layout}"] = work / seconds / 1e9
        for n in MATMULS:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            rates[f"matmul {n}^2"] = 2 * n**3 / best_seconds(lambda: a @ b, repeats) / 1e9
    return rates


def pack_rates(repeats, skip_nll, bf16):
    """{what: (milliseconds, GFLOP, GFLOP/s)} for the built-in models."""
    ck = load_checkpoint(model_file("builtin/tiny-shapes.safetensors"))
    model = DiffusionModel.from_checkpoint(ck)
    net = ck.denoiser
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.full((2,), 500.0)
    context = model.empty_context.expand(2, -1, -1)
    rows = {}
    variants = (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if bf16 else ())
    with torch.inference_mode():
        for name, dtype in variants:  # as sampling calls it: accel.fast_network (channels-last on the CPU)
            fast = fast_network(copy.deepcopy(net).to(dtype))
            call = lambda: fast(x, t, context.to(dtype))  # noqa: E731
            rows[f"UNet call (batch 2, 16x16) {name}"] = (best_seconds(call, repeats), flops(call))

    latent = torch.zeros(1, 4, 16, 16)
    schedule = ScheduleSpec("model", 41, "karras").sigmas(ck.schedule)
    for name, dtype in variants:  # the model as LDMLoadModel gives it in that precision
        steps_model = model if dtype == torch.float32 else DiffusionModel.from_checkpoint(
            load_checkpoint(model_file("builtin/tiny-shapes.safetensors"), dtype=dtype, vae_dtype=torch.float32))
        cond = Conditioning(steps_model.empty_context, "")

        work = None
        for how, sampled in (("", steps_model), (" compiled", replace(steps_model, compile=True))):
            def run(sigmas):
                return lambda: sample(sampled, latent, cond, cond, seed=0, sigmas=sigmas, sampler_name="dpmpp_2m",
                                      cfg=5.0, on_note=print)

            long_run, short_run = run(schedule), run(schedule[-2:])
            work = work or flops(short_run)  # the compiled package's work is the eager network's
            step = (best_seconds(long_run, max(3, repeats // 5)) - best_seconds(short_run, repeats)) / 40
            rows[f"sampling step (dpmpp_2m, CFG){how} {name}"] = (step, work)

    if not skip_nll:
        pixel = load_checkpoint(model_file("builtin/tiny-shapes-pixel.safetensors"))
        pixel_model = DiffusionModel.from_checkpoint(pixel)
        image = torch.from_numpy(read_image(PACK / "input" / "shapes_32.png")[0])[None]
        steps = 255  # 256 evaluated timesteps (L_0 and 255 drawn): 4 calls at batch 64
        bound = lambda: likelihood(pixel_model, pixel.vae, image, steps=steps)  # noqa: E731
        seconds = best_seconds(bound, max(2, repeats // 10))
        rows["nll timestep (pixel, 32x32) fp32"] = (seconds / (steps + 1), flops(bound) / (steps + 1))
    return {name: (s * 1e3, f / 1e9, f / s / 1e9) for name, (s, f) in rows.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-nll", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time instead of "
                        "the wall clock: on a machine busy with other work, with one thread, the time the work "
                        "itself took, without the waits for a core")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    flags = cpu_flags()
    bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, avx512f={'avx512f' in flags} avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags}")
    best = {}
    for name, dtype in (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if bf16 else ()):
        rates = dense_rates(dtype, args.repeats)
        for kernel, rate in rates.items():
            print(f"  {name} {kernel:34s} {rate:7.1f} GFLOP/s")
        best[name] = max(rates.values())
        print(f"best dense {name}: {best[name]:.1f} GFLOP/s")
    for what, (ms, gflop, rate) in pack_rates(args.repeats, args.skip_nll, bf16).items():
        line = (f"{what:47s} {ms:8.2f} ms  {gflop:7.3f} GFLOP  {rate:6.1f} GFLOP/s  "
                f"{100 * rate / best['fp32']:5.1f} % of best dense fp32")
        if what.endswith("bf16"):
            line += f", {100 * rate / best['bf16']:5.1f} % of best dense bf16"
        print(line)


if __name__ == "__main__":
    main()
