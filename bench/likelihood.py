"""Bits per dimension of held-out scenes against uniform noise, under a pixel-space model.

    python bench/likelihood.py [--model builtin/tiny-shapes-pixel.safetensors] [--images 16] [--steps 0] [--json FILE]

Held-out scenes are new renders of the procedural dataset (data seed SCENE_SEED, never a training
seed), box-downsampled to the model's training size, each scored with its own caption and with the
empty prompt; uniform-noise images (every 8-bit value equally likely, so 8 bits/dim is the cost of
storing them raw) with the empty prompt. Every image gets DDPM's bound over all T timesteps
(--steps 0) or a strided estimate. Prints mean and spread per group, and the bound's parts
(L_T, the sum of L_t-1, L_0). Deterministic: same model and arguments, same figures.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.pipeline import DiffusionModel, likelihood
from ldm_nodes.core.text import CLIPTokenizer, encode_prompt
from ldm_nodes.nodes.model_paths import model_file
from ldm_nodes.tools.evaluation import SCENE_SEED, scenes

def groups(resolution, n):
    """{name: (images [n, H, W, 3] in 0..1, captions or None)} for the three groups."""
    images, captions = scenes(n, resolution)
    images = images.permute(0, 2, 3, 1).float() / 255
    g = torch.Generator().manual_seed(SCENE_SEED)
    noise = torch.randint(0, 256, (n, resolution, resolution, 3), generator=g).float() / 255
    return {"scenes, their caption": (images, captions), "scenes, empty prompt": (images, None),
            "uniform noise, empty prompt": (noise, None)}


def score(checkpoint, model, images, captions, steps):
    rows = []
    tokenizer = CLIPTokenizer()
    for i in range(len(images)):
        context = None
        if captions is not None:
            with torch.inference_mode():
                context = encode_prompt(tokenizer, checkpoint.text_encoder, captions[i])
        bound = likelihood(model, checkpoint.vae, images[i:i + 1], context, steps=steps, seed=i)
        per_dim = bound.nats[0] / bound.total[0]
        rows.append({"total": float(bound.total[0]), "prior": float(bound.prior[0] / per_dim),
                     "terms": float((bound.total[0] - (bound.prior[0] + bound.decoder[0]) / per_dim)),
                     "decoder": float(bound.decoder[0] / per_dim), "unit": bound.unit})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/tiny-shapes-pixel.safetensors")
    parser.add_argument("--images", type=int, default=16, help="images per group")
    parser.add_argument("--steps", type=int, default=0, help="0: all timesteps; K: strided estimate")
    parser.add_argument("--json", help="write the per-image figures here")
    args = parser.parse_args()
    path = model_file(args.model)
    checkpoint = load_checkpoint(path)
    model = DiffusionModel.from_checkpoint(checkpoint)
    resolution = checkpoint.resolution or 64
    report = {"model": args.model, "steps": args.steps, "resolution": resolution, "groups": {}}
    print(f"{args.model}: {args.images} images per group at {resolution}x{resolution}, "
          f"{'all timesteps' if not args.steps else f'{args.steps} sampled timesteps'}")
    for name, (images, captions) in groups(resolution, args.images).items():
        rows = score(checkpoint, model, images, captions, args.steps)
        totals = torch.tensor([r["total"] for r in rows])
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("prior", "terms", "decoder")}
        print(f"  {name:<28} {totals.mean():8.3f} +- {totals.std():.3f} {rows[0]['unit']}   "
              f"(L_T {mean['prior']:.2g}, sum L_t-1 {mean['terms']:.3f}, L_0 {mean['decoder']:.3f})", flush=True)
        report["groups"][name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
