"""The shipped model: listed first, within budget, deterministic per seed, still the image we shipped."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_nodes import model_paths, runner
from ldm_nodes.core.checkpoint import load_checkpoint, read_model_metadata
from ldm_nodes.core.data import parse_caption
from ldm_nodes.nodes import LDMLoadModel

PACK = Path(model_paths.__file__).resolve().parent
MODEL = "builtin/tiny-shapes.safetensors"
GOLDEN = PACK / "tests" / "golden" / "tiny-shapes-txt2img-seed42.png"
sys.path.insert(0, str(PACK / "bench"))
from scene_analysis import analyse  # noqa: E402


def test_listed_first_and_within_budget():
    assert LDMLoadModel.INPUT_TYPES()["required"]["ckpt_name"][0][0] == MODEL
    total = sum(p.stat().st_size for p in (PACK / "models").glob("*.safetensors"))
    assert total < 25 * 1024 * 1024
    meta = read_model_metadata(model_paths.resolve_model(MODEL))
    assert meta["prediction"] == "eps" and meta["training"]["data_seed"] == 0


def txt2img(tmp_path, **overrides):
    prompt = runner.apply_overrides(runner.load_workflow(PACK / "workflows" / "api" / "txt2img.json"),
                                    [f"{k}={v}" for k, v in overrides.items()])
    [path] = runner.run(prompt, out_dir=tmp_path, input_dir=PACK / "input")
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_txt2img_workflow_reproduces_the_golden_image(tmp_path):
    """The shipped workflow, run headless, gives the image shipped beside this test (regenerate it only
    when the model changes on purpose). Bit-exact on the machine that made it; other CPUs may round
    convolutions differently, hence the small tolerance."""
    image = txt2img(tmp_path)
    golden = np.asarray(Image.open(GOLDEN).convert("RGB")).astype(np.int16)
    difference = np.abs(image - golden)
    assert difference.mean() < 1.0 and difference.max() <= 24, (difference.mean(), difference.max())


def test_same_seed_same_image_other_seed_other_image(tmp_path):
    a, b = txt2img(tmp_path / "a"), txt2img(tmp_path / "b")
    assert np.array_equal(a, b)
    assert np.abs(txt2img(tmp_path / "c", **{"6.seed": 7}) - a).mean() > 1.0


def test_the_workflow_prompt_is_followed(tmp_path):
    words = parse_caption(runner.load_workflow(PACK / "workflows" / "api" / "txt2img.json")["2"]["inputs"]["text"])
    read = analyse(txt2img(tmp_path).astype(np.uint8))
    assert {k: read[k] for k in words} == words


def test_loads_in_half_precision():
    ck = load_checkpoint(model_paths.resolve_model(MODEL), dtype=torch.bfloat16)
    assert {p.dtype for p in ck.denoiser.parameters()} == {torch.bfloat16}
