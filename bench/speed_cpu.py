"""CPU speed of a built-in model with its trained weights, beside diffusers' UNet of the same shape.

    python bench/speed_cpu.py [--model builtin/tiny-shapes.safetensors] [--repeats 5]

Times (median of --repeats, after a warm-up), all in this process after loading:
  - one 64x64 image: prompt and empty-prompt encoding, 20 dpmpp_2m steps with CFG (batch 2 through
    the UNet), decoding;
  - one CFG denoiser step (batch 2) of ours and, for a UNet, of diffusers' UNet2DConditionModel built
    with the same configuration (random weights: speed does not depend on their values).
bench/speed.py times SD1.5 shapes on a GPU, and the tiny shapes with random weights at several batches.
Prints milliseconds and the ratio ours / diffusers (below 1: ours is faster).
"""
import argparse

import torch

from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, decode_latent, sample
from ldm_nodes.core.text import CLIPTokenizer, encode_prompt
from ldm_nodes.core.unet import UNetModel
from ldm_nodes.nodes.model_paths import model_file
from speed import diffusers_unet, timed

CPU = torch.device("cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/tiny-shapes.safetensors")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args()
    ck = load_checkpoint(model_file(args.model))
    vae, tokenizer = ck.vae, CLIPTokenizer()
    model = DiffusionModel.from_checkpoint(ck)
    sigmas = ScheduleSpec("model", 20, "karras").sigmas(ck.schedule)
    latent = torch.zeros(1, vae.config.embed_dim, 64 // vae.config.f, 64 // vae.config.f)

    def image():
        with torch.inference_mode():
            cond = Conditioning(encode_prompt(tokenizer, ck.text_encoder, "a small green square on the left on a white background"), "")
            uncond = Conditioning(encode_prompt(tokenizer, ck.text_encoder, ""), "")
        decode_latent(vae, sample(model, latent, cond, uncond, seed=0, sampler_name="dpmpp_2m", cfg=args.cfg,
                                  sigmas=sigmas))

    torch.manual_seed(0)
    is_unet = isinstance(ck.denoiser, UNetModel)
    reference = diffusers_unet(ck.denoiser.config, latent.shape[-1]).eval() if is_unet else None
    x = torch.randn(2, *latent.shape[1:])
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, ck.denoiser.config.context_dim)

    def ours():
        with torch.inference_mode():
            ck.denoiser(x, t, context)

    def theirs():
        with torch.inference_mode():
            reference(x, t, encoder_hidden_states=context)

    ms_image = timed(image, args.repeats, CPU)
    ms_ours = timed(ours, args.repeats * 10, CPU)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}")
    print(f"one 64x64 image, 20 steps, CFG {args.cfg}: {ms_image:8.1f} ms")
    line = f"{type(ck.denoiser).__name__} CFG step (batch 2)    ours {ms_ours:6.2f} ms"
    if is_unet:
        ms_theirs = timed(theirs, args.repeats * 10, CPU)
        line += f"  diffusers {ms_theirs:6.2f} ms  ratio {ms_ours / ms_theirs:.2f}"
    print(line)


if __name__ == "__main__":
    main()
