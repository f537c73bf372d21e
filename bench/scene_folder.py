"""A folder of captioned pictures as a user has them, for measuring `train --data` recipes.

    python bench/scene_folder.py OUT [--images 1000] [--seed 7]

Writes OUT/0000.png ... (64 x 64 RGB procedural scenes of core/data.py) and a same-name .txt caption
beside each ("a large red circle in the center on a white background"): the folder README.md's recipe
"Will it follow my prompts?" was measured on (--images 1000 --seed 7), read back afterwards with
`python bench/adherence.py --model OUT_RUN/model.safetensors --size 32 --seeds 2`.
"""
import argparse
from pathlib import Path

from PIL import Image

from ldm_nodes.core.data import make_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = make_dataset(args.images, args.seed)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(caption)
    print(f"{len(captions)} pictures with captions in {out}")


if __name__ == "__main__":
    main()
