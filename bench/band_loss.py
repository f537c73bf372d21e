"""Where in the noise range a model errs: L_simple per timestep band, on held-out scenes.

    python bench/band_loss.py [--model builtin/tiny-shapes.safetensors ...] [--images 256]

Every model sees the same held-out scenes (data seed likelihood.SCENE_SEED, each with its caption),
the same posterior samples of their latents z0 = scale * (mean + std * n) as in training, and in each
band the same timesteps (one per scene, uniform in the band) and the same noise eps. Prints, per band,
the mean || target - network(z_t, t, c) ||^2 (eq. 14 restricted to the band; the target is eps for
eps-prediction models). Low bands are where edges are decided, high bands the layout. Models compared
in one table must share a latent shape. Deterministic: same models and arguments, same figures.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from likelihood import SCENE_SEED, scenes  # noqa: E402

from ldm_nodes.core.checkpoint import load_checkpoint  # noqa: E402
from ldm_nodes.core.objective import q_sample, training_target  # noqa: E402
from ldm_nodes.core.train import caption_ids, encode_dataset  # noqa: E402
from ldm_nodes.model_paths import model_file  # noqa: E402

BANDS = ((0, 50), (50, 150), (150, 300), (300, 500), (500, 700), (700, 850), (850, 1000))


def band_losses(checkpoint, images, captions, bands=BANDS, batch=64):
    """[mean loss per band]; the randomness (posterior sample, timesteps, noise) comes from one
    generator seeded SCENE_SEED, so models with the same latent shape see the same draws."""
    with torch.inference_mode():
        network, vae, text = (m.float().eval() for m in (checkpoint.denoiser, checkpoint.vae, checkpoint.text_encoder))
        ids, _ = caption_ids(captions)
        context = text(ids)
        mean, std = encode_dataset(vae, images, "cpu")
        g = torch.Generator().manual_seed(SCENE_SEED)
        z0 = vae.config.scale_factor * (mean + std * torch.randn(mean.shape, generator=g))
        losses = []
        for low, high in bands:
            t = torch.randint(low, high, (len(z0),), generator=g)
            eps = torch.randn(z0.shape, generator=g)
            alpha_bar = checkpoint.schedule.alpha_bar[t]
            target = training_target(z0, eps, alpha_bar, checkpoint.prediction)
            z_t = q_sample(z0, alpha_bar, eps)
            total = 0.0
            for i in range(0, len(z0), batch):
                out = network(z_t[i:i + batch], t[i:i + batch].float(), context[i:i + batch])
                total += ((out - target[i:i + batch]) ** 2).flatten(1).mean(1).sum().item()
            losses.append(total / len(z0))
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="repeat to compare models (default: tiny-shapes)")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    print("t band: " + " | ".join(f"{low}-{high}" for low, high in BANDS))
    for name in args.model or ["builtin/tiny-shapes.safetensors"]:
        checkpoint = load_checkpoint(model_file(name))
        images, captions = scenes(args.images, checkpoint.resolution or 64)
        print(f"{name}: " + " | ".join(f"{loss:.4f}" for loss in band_losses(checkpoint, images, captions)), flush=True)


if __name__ == "__main__":
    main()
