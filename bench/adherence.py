"""Prompt adherence of a shapes model: generate from held-out captions, read the images back.

    python bench/adherence.py [--model builtin/tiny-shapes.safetensors] [--cfg 5] [--seeds 3] [--size 64] [--json FILE]

For every caption of core/data.held_out_captions(seed) (every color, background, shape, position and
size at least once) and each of --seeds seeds, one 64x64 image is sampled with 20-step dpmpp_2m on
karras sigmas and the given cfg, the empty prompt as negative, then read back by
ldm_nodes/tools/scene_analysis.py (plain image analysis, no learned model). A model trained at another
resolution (train --resolution 32) is sampled at --size and its images enlarged to 64x64 (nearest) to be read. Prints the share of images whose
color, background, shape, position and size match the caption. Deterministic: same model and
arguments, same figures.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.data import held_out_captions, parse_caption
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, decode_latent, sample
from ldm_nodes.core.text import CLIPTokenizer, encode_prompt
from ldm_nodes.nodes.model_paths import model_file
from ldm_nodes.tools.scene_analysis import analyse

ATTRIBUTES = ("color", "background", "shape", "position", "size")
TARGETS = {"color": 0.95, "background": 0.95, "position": 0.90, "shape": 0.85, "size": 0.90}
CAPTION_SEED = 1234


def generate(checkpoint, captions, seed, cfg, steps=20, size=64, sampler="dpmpp_2m"):
    """One image per caption, all in one batch: IMAGE [N, size, size, 3]."""
    tokenizer = CLIPTokenizer()
    with torch.inference_mode():
        cond = torch.cat([encode_prompt(tokenizer, checkpoint.text_encoder, c) for c in captions])
        uncond = encode_prompt(tokenizer, checkpoint.text_encoder, "")
    vae = checkpoint.vae
    model = DiffusionModel.from_checkpoint(checkpoint)
    f = vae.config.f
    latent = torch.zeros(len(captions), vae.config.embed_dim, size // f, size // f)
    sigmas = ScheduleSpec("model", steps, "karras").sigmas(checkpoint.schedule)
    out = sample(model, latent, Conditioning(cond, ""), Conditioning(uncond, ""), seed=seed, sampler_name=sampler,
                 cfg=cfg, sigmas=sigmas)
    return decode_latent(vae, out)


def evaluate(checkpoint, cfg, seeds, caption_seed=CAPTION_SEED, size=64):
    """{attribute: share correct} over held-out captions x seeds, and the per-image records."""
    captions = held_out_captions(caption_seed)
    records = []
    for seed in range(seeds):
        images = generate(checkpoint, captions, seed, cfg, size=size)
        if size != 64:
            images = F.interpolate(images.permute(0, 3, 1, 2), size=64, mode="nearest").permute(0, 2, 3, 1)
        for caption, image in zip(captions, images):
            read = analyse((image.numpy() * 255).round().astype(np.uint8))
            want = parse_caption(caption)
            records.append({"caption": caption, "seed": seed, "read": {a: read[a] for a in ATTRIBUTES},
                            "correct": {a: read[a] == want[a] for a in ATTRIBUTES}})
    scores = {a: sum(r["correct"][a] for r in records) / len(records) for a in ATTRIBUTES}
    return scores, records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/tiny-shapes.safetensors")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="sampled size (the model's training resolution)")
    parser.add_argument("--json", help="write scores and per-image records here")
    args = parser.parse_args()
    checkpoint = load_checkpoint(model_file(args.model))
    scores, records = evaluate(checkpoint, args.cfg, args.seeds, size=args.size)
    print(f"{args.model}: {len(records)} images at {args.size}x{args.size}, cfg {args.cfg}, 20-step dpmpp_2m (karras)")
    for a in ATTRIBUTES:
        verdict = "ok" if scores[a] >= TARGETS[a] else f"below target {TARGETS[a]:.0%}"
        print(f"  {a:<10} {scores[a]:6.1%}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cfg": args.cfg, "scores": scores,
                                               "records": records}, indent=1))


if __name__ == "__main__":
    main()
