"""CPU speed of the built-in model, beside diffusers' UNet of the same shape in the same run.

    python bench/speed_cpu.py [--model builtin/tiny-shapes.safetensors] [--repeats 5]

Times (median of --repeats, after a warm-up), all in this process after loading:
  - one 64x64 image: prompt and empty-prompt encoding, 20 dpmpp_2m steps with CFG (batch 2 through
    the UNet), decoding;
  - one CFG UNet step (batch 2) of ours and of diffusers' UNet2DConditionModel built with the same
    configuration (random weights: speed does not depend on their values).
Prints milliseconds and the ratio ours / diffusers (below 1: ours is faster).
"""
import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, decode_latent, sample
from ldm_nodes.core.text import CLIPTokenizer, encode_prompt
from ldm_nodes.model_paths import resolve_model


def diffusers_unet(config):
    """diffusers' UNet2DConditionModel with the shapes of our UNetConfig."""
    channels = [config.model_channels * m for m in config.channel_mult]
    attn = [i in config.attention_levels for i in range(len(channels))]
    return UNet2DConditionModel(
        sample_size=16, in_channels=config.in_channels, out_channels=config.out_channels,
        layers_per_block=config.num_res_blocks, block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        cross_attention_dim=config.context_dim, transformer_layers_per_block=config.transformer_depth,
        attention_head_dim=[config.heads(c) for c in channels],  # diffusers' legacy name: the number of heads
        use_linear_projection=config.use_linear_in_transformer).eval()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/tiny-shapes.safetensors")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args()
    ck = load_checkpoint(resolve_model(args.model) if args.model.startswith("builtin/") else args.model)
    vae, tokenizer = ck.vae, CLIPTokenizer()
    model = DiffusionModel.from_checkpoint(ck)
    sigmas = ScheduleSpec("model", 20, "karras").sigmas(ck.schedule)
    latent = torch.zeros(1, vae.config.embed_dim, 64 // vae.config.f, 64 // vae.config.f)

    def image():
        with torch.inference_mode():
            cond = Conditioning(encode_prompt(tokenizer, ck.text_encoder, "a small green square on the left on a white background"), "")
            uncond = Conditioning(encode_prompt(tokenizer, ck.text_encoder, ""), "")
        decode_latent(vae, sample(model, latent, cond, uncond, 0, "dpmpp_2m", args.cfg, sigmas))

    torch.manual_seed(0)
    reference = diffusers_unet(ck.denoiser.config)
    x = torch.randn(2, *latent.shape[1:])
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, ck.denoiser.config.context_dim)

    def ours():
        with torch.inference_mode():
            ck.denoiser(x, t, context)

    def theirs():
        with torch.inference_mode():
            reference(x, t, encoder_hidden_states=context)

    ms_image = timed(image, args.repeats)
    ms_ours, ms_theirs = timed(ours, args.repeats * 10), timed(theirs, args.repeats * 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}")
    print(f"one 64x64 image, 20 steps, CFG {args.cfg}: {ms_image:8.1f} ms")
    print(f"UNet CFG step (batch 2)    ours {ms_ours:6.2f} ms  diffusers {ms_theirs:6.2f} ms  "
          f"ratio {ms_ours / ms_theirs:.2f}")


if __name__ == "__main__":
    main()
