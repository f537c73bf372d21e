"""Speed of our denoiser step, VAE decode and whole image beside diffusers', in the same process.

    python bench/speed.py                       # CUDA when present: SD1.5 shapes, fp16 and bf16
    python bench/speed.py --device cpu          # the built-in model's tiny shapes, fp32
    python bench/speed.py --json results.json   # the same table as JSON

bench/gpu_check.py runs this on a lent GPU with everything it needs (bench/README.md).

Every model is built from its configuration with every parameter redrawn (ldm_nodes/tools/randomise.py): speed
does not depend on the values, but zero-initialised layers would let a kernel skip work. Rows:
  - the UNet step at batch 1, 2 and 8 (batch 2 is one CFG step of one image), latent 64x64 on CUDA
    (512x512 images) or the built-in 16x16 on the CPU: ours eagerly and through the sampler's fast path
    (core/accel.py: a captured CUDA graph; on the CPU the same as eager), each with NCHW and with
    channels-last (NHWC) weights, and diffusers' UNet2DConditionModel of the same shape;
  - the VAE decode of one latent, in the row's precision and in fp32, NCHW and NHWC;
  - one whole image: prompt and empty-prompt encoding, `--steps` dpmpp_2m CFG steps and decoding,
    with its peak GPU memory: allocated and reserved by torch, and the CUDA context (what the device
    reports in use beyond torch's reservation at the start), all in GiB. diffusers' twin runs the same
    work by hand (their text model, UNet, DPM++ 2M scheduler and VAE) as StableDiffusionPipeline would.
cuDNN runs with torch's defaults (no cudnn.benchmark), as the product does.
Times are medians of --repeats after warm-up. MFU is the step's FLOPs (torch's FlopCounterMode) per
second over the rate of a square matmul (--matmul, 8192 on CUDA) timed in the same run and precision.
diffusers and transformers are optional: when one is not installed at all its rows are left out; one
that is installed but fails to import raises (a bad wheel set must not drop rows silently).
"""
import argparse
import importlib.util
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm_nodes.core.accel import channels_last, fast_network
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, decode_latent, sample
from ldm_nodes.tools.randomise import randomise
from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, encode_prompt, tokenize_weighted
from ldm_nodes.core.families import FAMILIES
from ldm_nodes.core.train import TINY_AUTOENCODER, TINY_TEXT
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.nodes import host

SD15_UNET = UNetConfig(4, 4, 320, (1, 2, 4, 4), 2, (0, 1, 2), 1, 768, num_heads=8)
SHAPES = {  # device type -> (UNet, autoencoder, text encoder, image size)
    "cuda": (SD15_UNET, AutoencoderConfig(), CLIPTextConfig(), 512),
    "cpu": (FAMILIES["unet"].tiny, TINY_AUTOENCODER, TINY_TEXT, 64),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"


def diffusers_unet(config, size):
    """diffusers' UNet2DConditionModel with the shapes of our UNetConfig."""
    from diffusers import UNet2DConditionModel

    channels = [config.model_channels * m for m in config.channel_mult]
    attn = [i in config.attention_levels for i in range(len(channels))]
    return UNet2DConditionModel(
        sample_size=size, in_channels=config.in_channels, out_channels=config.out_channels,
        layers_per_block=config.num_res_blocks, block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        cross_attention_dim=config.context_dim, transformer_layers_per_block=config.transformer_depth,
        attention_head_dim=[config.heads(c) for c in channels],  # diffusers' legacy name: the number of heads
        use_linear_projection=config.use_linear_in_transformer)


def diffusers_vae(config):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    n = len(config.ch_mult)
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.z_channels,
        block_out_channels=[config.ch * m for m in config.ch_mult], layers_per_block=config.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        scaling_factor=config.scale_factor)


def transformers_text(config):
    import transformers

    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.max_positions, hidden_act=config.activation))


def optional(module, build, *args):
    """build(*args), diffusers' or transformers' twin; None where `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        return None
    return build(*args)


def timed(fn, repeats, device):
    """Median milliseconds of fn() over `repeats` calls after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def matmul_rate(n, dtype, device, repeats):
    """FLOP/s of an n x n x n matmul: the peak MFU is measured against."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / (timed(lambda: a @ b, repeats, device) / 1000)


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def prepare(module, device, dtype):
    return randomise(module).to(device, dtype)


def step_rows(unet, theirs, latent, context_dim, device, dtype, repeats, peak, batches=(1, 2, 8)):
    """Per batch: ours eager and through the sampler's fast path, with NCHW and then channels-last
    weights, and diffusers. The fast path's state is fp32, as in a sampling run."""
    inputs = {}
    for batch in batches:
        inputs[batch] = (torch.randn(batch, 4, latent, latent, device=device),
                         torch.full((batch,), 500.0, device=device),
                         torch.randn(batch, 77, context_dim, device=device, dtype=dtype))
    rows = [{"what": f"UNet step, batch {b}", "flops": flops(lambda: unet(x.to(dtype), t, c))}
            for b, (x, t, c) in inputs.items()]
    for suffix in ("", "_nhwc"):
        if suffix:
            channels_last(unet)
        fast = fast_network(unet)  # as in a sampling run; its graphs are kept per shape
        for row, (x, t, context) in zip(rows, inputs.values()):
            x_net = x.to(dtype)
            row["ours" + suffix] = timed(lambda: unet(x_net, t, context), repeats, device)
            row["ours_fast" + suffix] = timed(lambda: fast(x, t, context), repeats, device)
    for row, (x, t, context) in zip(rows, inputs.values()):
        if theirs is not None:
            row["diffusers"] = timed(lambda: theirs(x.to(dtype), t, encoder_hidden_states=context), repeats, device)
        row["mfu_fast"] = row["flops"] / (min(row["ours_fast"], row["ours_fast_nhwc"]) / 1000) / peak
    unet.to(memory_format=torch.contiguous_format)  # back to NCHW: the layout choice is accel.gpu_layout's
    return rows


def decode_rows(vae_config, theirs_vae, latent, device, dtype, repeats):
    rows = []
    for label in dict.fromkeys((dtype, "fp32")):
        vae = prepare(AutoencoderKL(vae_config), device, DTYPES[label])
        # both start from the same latent already on the device in the row's dtype and end with the image
        # in fp32 on the host (ours: decode_latent, the product's path, with its finite check and clamp)
        z = torch.randn(1, vae_config.embed_dim, latent, latent).to(device, DTYPES[label])
        row = {"what": f"VAE decode, {label}", "ours": timed(lambda: decode_latent(vae, z), repeats, device)}
        channels_last(vae)
        row["ours_nhwc"] = timed(lambda: decode_latent(vae, z), repeats, device)
        if theirs_vae is not None:
            twin = theirs_vae.to(device, DTYPES[label])
            row["diffusers"] = timed(lambda: twin.decode(z).sample.float().cpu(), repeats, device)
        rows.append(row)
    return rows


def image_row(unet, text, vae, twins, latent, steps, cfg, device, repeats):
    """One whole image, ours through core/pipeline as LDMSample calls it (with its per-step callback);
    diffusers' twin by hand."""
    tokenizer = CLIPTokenizer()
    schedule = TrainingSchedule("scaled_linear")
    model = DiffusionModel(unet, schedule, "eps", vae.config.scale_factor, vae.config.embed_dim)
    sigmas = sampling_schedule(schedule, steps, "karras").sigmas
    start = torch.zeros(1, vae.config.embed_dim, latent, latent)

    def ours():
        with torch.inference_mode():
            cond = Conditioning(encode_prompt(tokenizer, text, PROMPT), PROMPT)
            uncond = Conditioning(encode_prompt(tokenizer, text, ""), "")
        progress = host.progress(len(sigmas) - 1)  # LDMSample's callback (no preview outside ComfyUI): with
        # a callback the sampler's monitor checks the latent is finite on the host after every step
        return decode_latent(vae, sample(model, start, cond, uncond, seed=0, sampler_name="dpmpp_2m", cfg=cfg,
                                         sigmas=sigmas, callback=lambda step: progress.update(step["i"] + 1)))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"what": f"whole image, {steps} CFG steps", "ours": timed(ours, repeats, device)}
    if device.type == "cuda":  # the diffusers twins sit idle on the GPU meanwhile: not ours to count
        idle = sum(p.numel() * p.element_size() for m in twins if m is not None for p in m.parameters())
        row["ours_peak_allocated_gib"] = (torch.cuda.max_memory_allocated() - idle) / 2**30
        row["ours_peak_reserved_gib"] = (torch.cuda.max_memory_reserved() - idle) / 2**30
    if None not in twins:
        row["diffusers"] = timed(lambda: diffusers_image(*twins, tokenizer, latent, steps, cfg, device), repeats, device)
    return row


@torch.inference_mode()
def diffusers_image(unet, text, vae, tokenizer, latent, steps, cfg, device):
    from diffusers import DPMSolverMultistepScheduler

    ids = torch.cat([tokenize_weighted(tokenizer, p)[0] for p in (PROMPT, "")]).to(device)
    context = text(ids).last_hidden_state.to(unet.dtype)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            use_karras_sigmas=True)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(1, 4, latent, latent, device=device, dtype=unet.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        cond, uncond = unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float().cpu()


def cuda_context_gib(device):
    """What the device reports in use beyond torch's reservation: the CUDA context and its libraries
    (and any other process on the device). Measured once, before the models are built."""
    torch.cuda.init()
    torch.ones(1, device=device)  # the context and the caching allocator exist from here
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / 2**30


def run(device, dtype, args, shapes=None, batches=(1, 2, 8)):
    unet_config, vae_config, text_config, size = shapes or SHAPES[device.type]
    latent = size // vae_config.f
    precision = DTYPES[dtype]
    peak = matmul_rate(args.matmul or (8192 if device.type == "cuda" else 2048), precision, device, args.repeats)
    with torch.inference_mode():
        unet = prepare(UNetModel(unet_config), device, precision)
        theirs = optional("diffusers", diffusers_unet, unet_config, latent)
        theirs = prepare(theirs, device, precision) if theirs is not None else None
        rows = step_rows(unet, theirs, latent, unet_config.context_dim, device, precision, args.repeats, peak, batches)
        theirs_vae = optional("diffusers", diffusers_vae, vae_config)
        theirs_vae = randomise(theirs_vae) if theirs_vae is not None else None
        rows += decode_rows(vae_config, theirs_vae, latent, device, dtype, args.repeats)
    # the whole image as LDMLoadModel's precision would place it: the autoencoder in fp32 unless bf16
    vae_precision = torch.bfloat16 if dtype == "bf16" else torch.float32
    text = prepare(CLIPTextModel(text_config), device, precision)
    vae = prepare(AutoencoderKL(vae_config), device, vae_precision)
    twins = (theirs, optional("transformers", transformers_text, text_config), theirs_vae)
    if None not in twins:
        twins = (theirs, prepare(twins[1], device, precision), twins[2].to(device, vae_precision))
    rows.append(image_row(unet, text, vae, twins, latent, args.steps or (30 if device.type == "cuda" else 20),
                          args.cfg, device, max(3, args.repeats // 4)))
    for row in rows:
        row.update(device=str(device), dtype=dtype, matmul_tflops=peak / 1e12)
    return rows


def measure(device, dtypes, args, shapes=None, batches=(1, 2, 8)):
    """run() for each dtype, the CUDA context (measured first) added to the whole-image rows."""
    context = cuda_context_gib(device) if device.type == "cuda" else None
    rows = [row for dtype in dtypes for row in run(device, dtype, args, shapes, batches)]
    for row in rows:
        if "ours_peak_allocated_gib" in row:
            row["cuda_context_gib"] = context
    return rows


TIMES = ("ours", "ours_nhwc", "ours_fast", "ours_fast_nhwc", "diffusers")
HEADERS = ("ours ms", "NHWC ms", "fast ms", "fast NHWC", "diffusers")


def table(rows):
    """The rows as a markdown table: milliseconds, ours (best of our columns) / diffusers, MFU, memory."""
    lines = ["| what | dtype | " + " | ".join(HEADERS) + " | ratio | MFU | peak memory |",
             "|---|---|" + "---|" * (len(HEADERS) + 3)]
    for r in rows:
        best = min(r[k] for k in TIMES[:-1] if k in r)
        ratio = f"{best / r['diffusers']:.2f}" if "diffusers" in r else ""
        cells = [f"{r[k]:.2f}" if k in r else "" for k in TIMES]
        mfu = f"{r['mfu_fast']:.1%}" if "mfu_fast" in r else ""
        memory = (f"{r['ours_peak_allocated_gib']:.2f} GiB allocated, {r['ours_peak_reserved_gib']:.2f} GiB reserved, "
                  f"+{r['cuda_context_gib']:.2f} GiB CUDA context" if "ours_peak_allocated_gib" in r else "")
        lines.append(f"| {r['what']} | {r['dtype']} | " + " | ".join(cells) + f" | {ratio} | {mfu} | {memory} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default fp16,bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=0, help="whole-image steps; default 30 on CUDA, 20 on the CPU")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--matmul", type=int, default=0, help="side of the peak matmul; default 8192 on CUDA, 2048 on the CPU")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("fp16,bf16" if device.type == "cuda" else "fp32")).split(",")
    print(f"torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    rows = measure(device, dtypes, args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
