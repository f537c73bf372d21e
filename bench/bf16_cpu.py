"""bf16 against fp32 on the CPU: the built-in models' images, and an SD1.5-shaped UNet's speed.

    python bench/bf16_cpu.py [--seeds 4] [--repeats 2] [--skip-sd15]

- For each built-in latent model (UNet and transformer): the txt2img workflow's image (20 dpmpp_2m steps,
  CFG 5, the workflow's prompt) with the denoiser and text encoder in bf16, and with the denoiser compiled
  (LDMCompileModel, in fp32 and bf16; core/compiled.py builds its packages on the first run, about
  a minute each, kept in ~/.cache/ldm-nodes/compiled) against eager fp32, seeds 0..--seeds-1,
  same seed same noise; the sampler's state and the autoencoder stay fp32 (core/accel.run_fp32). Prints
  the mean and largest absolute difference of the 8-bit images in 1/255 steps, and the time of one image.
  `precision=auto` picks bf16 on a CPU with bf16 instructions only while every mean here is under
  nodes/loader.BF16_IMAGE_TOLERANCE (2/255).
- The pack's UNet with SD1.5's configuration and random weights (tools/randomise.py): one call at batch 2
  on a 64x64x4 latent with a 77x768 context, fp32 against bf16 weights (best of --repeats after one
  warm-up call, the two interleaved), and the relative difference of the outputs (largest |bf16 - fp32| / largest |fp32|).
"""
import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ldm_nodes.core.accel import cpu_layout, run_fp32
from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, decode_latent, sample
from ldm_nodes.core.text import CLIPTokenizer, encode_prompt
from ldm_nodes.core.unet import UNetModel
from ldm_nodes.nodes.model_paths import model_file
from ldm_nodes.tools.randomise import randomise
from speed import SD15_UNET

PACK = Path(__file__).resolve().parent.parent
MODELS = ("builtin/tiny-shapes.safetensors", "builtin/tiny-shapes-transformer.safetensors")


def image(name, dtype, seed, prompt, compile=False):
    ck = load_checkpoint(model_file(name), dtype=dtype, vae_dtype=torch.float32)
    model, tokenizer = replace(DiffusionModel.from_checkpoint(ck), compile=compile), CLIPTokenizer()
    with torch.inference_mode():
        cond = Conditioning(encode_prompt(tokenizer, ck.text_encoder, prompt), prompt)
        uncond = Conditioning(encode_prompt(tokenizer, ck.text_encoder, ""), "")
    f = ck.vae.config.f
    latent = torch.zeros(1, ck.vae.config.embed_dim, 64 // f, 64 // f)
    sigmas = ScheduleSpec("model", 20, "karras").sigmas(ck.schedule)
    start = time.perf_counter()
    z = sample(model, latent, cond, uncond, seed=seed, sigmas=sigmas, sampler_name="dpmpp_2m", cfg=5.0)
    pixels = decode_latent(ck.vae, z)
    seconds = time.perf_counter() - start
    return (pixels[0].numpy() * 255).round().astype(np.int16), seconds


def images(seeds):
    prompt = json.loads((PACK / "workflows/api/txt2img.json").read_text())["2"]["inputs"]["text"]
    variants = (("bf16", torch.bfloat16, False), ("fp32 compiled", torch.float32, True),
                ("bf16 compiled", torch.bfloat16, True))
    for name in MODELS:
        means, largest, times = {v: [] for v in variants}, dict.fromkeys(variants, 0), {v: [] for v in variants}
        reference_times = []
        for seed in range(seeds):
            reference, seconds = image(name, torch.float32, seed, prompt)
            reference_times.append(seconds)
            for variant in variants:
                pixels, seconds = image(name, variant[1], seed, prompt, variant[2])
                times[variant].append(seconds)
                diff = np.abs(pixels - reference)
                means[variant].append(diff.mean())
                largest[variant] = max(largest[variant], int(diff.max()))
        print(f"{name}: image {min(reference_times):.2f} s fp32")
        for variant in variants:
            print(f"  {variant[0]} - fp32 image, mean |diff| per seed {', '.join(f'{m:.2f}' for m in means[variant])} "
                  f"/255, largest {largest[variant]}/255; image {min(times[variant]):.2f} s")


def sd15(repeats):
    torch.manual_seed(0)
    nets = {torch.float32: randomise(UNetModel(SD15_UNET)).eval()}
    nets[torch.bfloat16] = copy.deepcopy(nets[torch.float32]).to(torch.bfloat16)
    x, t = torch.randn(2, 4, 64, 64), torch.full((2,), 500.0)
    context = torch.randn(2, 77, 768)
    outputs, best = {}, {dtype: float("inf") for dtype in nets}
    with torch.inference_mode():
        for dtype, net in nets.items():
            outputs[dtype] = run_fp32(cpu_layout(net), x, t, context.to(dtype))  # warm-up, and the output
        for _ in range(repeats):  # interleaved, so the machine's other load hits both alike
            for dtype, net in nets.items():
                start = time.perf_counter()
                run_fp32(net, x, t, context.to(dtype))
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    a, b = outputs[torch.float32], outputs[torch.bfloat16]
    ta, tb = best[torch.float32], best[torch.bfloat16]
    relative = float((a - b).abs().max() / a.abs().max())
    print(f"SD1.5-shaped UNet call (batch 2, 64x64x4, random weights, channels-last as sampling runs it): "
          f"fp32 {ta:.2f} s, bf16 {tb:.2f} s, speed-up {ta / tb:.2f}x, largest difference {100 * relative:.2f} % "
          f"of the largest output")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-sd15", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.seeds:
        images(args.seeds)
    if not args.skip_sd15:
        sd15(args.repeats)


if __name__ == "__main__":
    main()
