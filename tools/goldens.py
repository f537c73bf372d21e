"""Regenerate the golden files the tests compare against, and record where they were made.

    python -m ldm_nodes.tools.goldens [--check]

Run it only when a shipped model changes on purpose: it rewrites tests/golden/*.png (the shipped
txt2img workflows at fixed seeds, run headless) and tests/golden/record.json (the bits/dim of
input/shapes_32.png under the built-in pixel model, all timesteps, seed 0, and the torch version and
machine that made them). `--check` regenerates into a temporary folder and prints the largest pixel
difference and the bound's difference instead of writing.

Goldens are regression checks: they are the code's own output, so they catch a change, not an error.
Correctness rests on the independent oracles (closed forms, float64 references, diffusers and
transformers twins with random weights); never replace one of those by a golden.
"""
import argparse
import contextlib
import datetime
import io
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..headless import runner
from ..cli import main as cli

PACK = Path(__file__).resolve().parents[1]
GOLDEN = PACK / "tests" / "golden"
RECORD = GOLDEN / "record.json"
# (workflow, seed) -> the model whose image it is: <model>-txt2img-seed<seed>.png
IMAGES = {("txt2img", 42): "tiny-shapes", ("txt2img_transformer", 42): "tiny-shapes-transformer",
          ("txt2img_transformer", 7): "tiny-shapes-transformer"}
# the golden images are fp32 on every CPU: precision auto is bf16 on CPUs with bf16 instructions
FP32 = {"1.precision": "fp32"}
NLL_IMAGE = "shapes_32.png"  # in input/, scored by `nll`'s defaults: the pixel model, all timesteps


def image_path(workflow, seed, folder=GOLDEN):
    return folder / f"{IMAGES[workflow, seed]}-txt2img-seed{seed}.png"


def txt2img(out_dir, workflow="txt2img", **overrides):
    """The image file a shipped API workflow writes headless, with `--set`-style overrides."""
    prompt = runner.apply_overrides(runner.load_workflow(PACK / "workflows" / "api" / f"{workflow}.json"),
                                    [f"{k}={v}" for k, v in overrides.items()])
    [path] = runner.run(prompt, out_dir=out_dir, input_dir=PACK / "input")
    return path


def nll_bits_per_dim():
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        if cli(["nll", str(PACK / "input" / NLL_IMAGE), "--json"]) != 0:
            raise RuntimeError("nll failed")
    return json.loads(report.getvalue())["images"][0]["nll"]


def recorded_nll():
    return json.loads(RECORD.read_text())["nll"][NLL_IMAGE]


def regenerate(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for workflow, seed in IMAGES:
        with tempfile.TemporaryDirectory() as scratch:
            shutil.copyfile(txt2img(scratch, workflow, **{"6.seed": seed}, **FP32), image_path(workflow, seed, folder))
    record = {"nll": {NLL_IMAGE: round(nll_bits_per_dim(), 4)}, "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(), "threads": torch.get_num_threads(),
              "made": datetime.date.today().isoformat()}
    (folder / RECORD.name).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm_nodes.tools.goldens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the goldens instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        print(json.dumps(regenerate(GOLDEN), indent=1))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        record = regenerate(Path(scratch))
        for workflow, seed in IMAGES:
            new, old = (np.asarray(Image.open(image_path(workflow, seed, f)).convert("RGB"), dtype=np.int16)
                        for f in (Path(scratch), GOLDEN))
            print(f"{image_path(workflow, seed).name}: max pixel difference {np.abs(new - old).max()}")
    print(f"nll {NLL_IMAGE}: {record['nll'][NLL_IMAGE]} (golden {recorded_nll()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
