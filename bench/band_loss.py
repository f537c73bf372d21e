"""Where in the noise range a model errs: L_simple per timestep band, on held-out scenes.

    python bench/band_loss.py [--model builtin/tiny-shapes.safetensors ...] [--images 256]

Every model sees the same held-out scenes (data seed ldm_nodes.tools.evaluation.SCENE_SEED, each with its caption),
the same posterior samples of their latents z0 = scale * (mean + std * n) as in training, and in each
band the same timesteps (one per scene, uniform in the band) and the same noise eps. Prints, per band,
the mean || target - network(z_t, t, c) ||^2 (eq. 14 restricted to the band; the target is eps for
eps-prediction models). Low bands are where edges are decided, high bands the layout. Models compared
in one table must share a latent shape. Deterministic: same models and arguments, same figures.
"""
import argparse

from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.nodes.model_paths import model_file
from ldm_nodes.tools.evaluation import BANDS, band_losses, scenes


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
