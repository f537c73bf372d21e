"""The shipped models: listed first, within budget, deterministic per seed, still the images we shipped."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_nodes.headless import runner
from ldm_nodes.nodes import model_paths
from ldm_nodes.core.checkpoint import load_checkpoint, read_model_metadata
from ldm_nodes.core.data import parse_caption
from ldm_nodes.nodes import LDMLoadModel
from ldm_nodes.tools.evaluation import BANDS, band_losses, scenes
from ldm_nodes.tools.goldens import FP32, IMAGES as GOLDENS, image_path, recorded_nll, txt2img as txt2img_file
from ldm_nodes.tools.scene_analysis import analyse

PACK = Path(model_paths.__file__).resolve().parent.parent
MODEL = "builtin/tiny-shapes.safetensors"
TRANSFORMER = "builtin/tiny-shapes-transformer.safetensors"


def test_listed_first_and_within_budget():
    assert LDMLoadModel.INPUT_TYPES()["required"]["ckpt_name"][0][0] == MODEL
    assert model_paths.resolve_model(MODEL).stat().st_size < 25 * 1024 * 1024
    total = sum(p.stat().st_size for p in (PACK / "models").glob("*.safetensors"))
    assert total < 40 * 1024 * 1024
    meta = read_model_metadata(model_paths.resolve_model(MODEL))
    assert meta["prediction"] == "eps" and meta["training"]["data_seed"] == 0


def txt2img(tmp_path, workflow="txt2img", **overrides):
    return np.asarray(Image.open(txt2img_file(tmp_path, workflow, **overrides)).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("workflow, seed", GOLDENS)
def test_txt2img_workflow_reproduces_the_golden_image(tmp_path, workflow, seed):
    """The shipped workflow, run headless, gives the image shipped beside this test (regenerate it only
    when the model changes on purpose: python -m ldm_nodes.tools.goldens). Bit-exact on the machine that made it; other CPUs may round
    convolutions differently, hence the small tolerance. A REGRESSION CHECK, not a correctness test: the
    golden is this code's own output, so it says the output did not change, not that it is right. The
    independent oracles for correctness are elsewhere: test_samplers.py (closed forms), test_diffusers_parity.py,
    test_unet.py / test_text.py / test_autoencoder.py (diffusers and transformers twins), and
    test_the_workflow_prompt_is_followed below (the picture is read back against its prompt)."""
    image = txt2img(tmp_path, workflow, **{"6.seed": seed}, **FP32)
    golden = np.asarray(Image.open(image_path(workflow, seed)).convert("RGB")).astype(np.int16)
    difference = np.abs(image - golden)
    assert difference.mean() < 1.0 and difference.max() <= 24, (difference.mean(), difference.max())


def test_same_seed_same_image_other_seed_other_image(tmp_path):
    a, b = txt2img(tmp_path / "a"), txt2img(tmp_path / "b")
    assert np.array_equal(a, b)
    assert np.abs(txt2img(tmp_path / "c", **{"6.seed": 7}) - a).mean() > 1.0


@pytest.mark.parametrize("workflow", ["txt2img", "txt2img_transformer"])
def test_the_workflow_prompt_is_followed(tmp_path, workflow):
    caption = runner.load_workflow(PACK / "workflows" / "api" / f"{workflow}.json")["2"]["inputs"]["text"]
    words = parse_caption(caption)
    read = analyse(txt2img(tmp_path, workflow).astype(np.uint8))
    assert {k: read[k] for k in words} == words


def test_loads_in_half_precision():
    ck = load_checkpoint(model_paths.resolve_model(MODEL), dtype=torch.bfloat16)
    assert {p.dtype for p in ck.denoiser.parameters()} == {torch.bfloat16}


# --- the transformer (issue #8) -----------------------------------------------------------------


def test_transformer_model_holds_its_denoiser_and_shares_the_rest():
    path = model_paths.resolve_model(TRANSFORMER)
    meta = read_model_metadata(path)
    assert meta["family"] == "transformer" and meta["parts_from"] == {"text": MODEL, "vae": MODEL}
    assert meta["prediction"] == "eps" and meta["training"]["denoiser"] == "transformer"
    assert path.stat().st_size < 10 * 1024 * 1024
    ck, unet = load_checkpoint(path), load_checkpoint(model_paths.resolve_model(MODEL))
    assert type(ck.denoiser).__name__ == "TransformerModel"
    assert ck.schedule.config == unet.schedule.config and ck.vae.config == unet.vae.config
    for a, b in zip(ck.text_encoder.parameters(), unet.text_encoder.parameters()):
        assert torch.equal(a, b)


class ZeroEps(torch.nn.Module):
    def forward(self, x, t, context):
        return torch.zeros_like(x)


def test_band_loss_is_one_for_a_zero_predictor_and_falls_with_noise_for_the_model():
    """bench/band_loss.py: predicting eps = 0 scores E[eps^2] = 1 in every band; the shipped UNet
    scores far less, and less the noisier z_t (at high noise z_t is mostly eps itself)."""
    checkpoint = load_checkpoint(model_paths.resolve_model(MODEL))
    images, captions = scenes(32)
    zero = band_losses(dataclasses.replace(checkpoint, denoiser=ZeroEps()), images, captions)
    assert zero == pytest.approx([1.0] * len(BANDS), abs=0.04)
    trained = band_losses(checkpoint, images, captions)
    assert trained[0] < 0.5 and all(a > b for a, b in zip(trained, trained[1:]))


# --- the pixel-space model (DDPM's setting) ----------------------------------------------------

PIXEL = "builtin/tiny-shapes-pixel.safetensors"


def nll(*args):
    from ldm_nodes.cli import main
    return main(["nll", *map(str, args), "--json"])


def test_pixel_model_is_ddpm_in_pixel_space_sharing_the_text_encoder():
    meta = read_model_metadata(model_paths.resolve_model(PIXEL))
    assert meta["family"] == "unet" and meta["vae"] == {"channels": 3, "kind": "identity"}
    assert meta["parts_from"] == {"text": MODEL} and meta["training"]["resolution"] == 32
    assert meta["schedule"] == {"beta_schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                "beta_end": 0.02, "zero_terminal_snr": False} and meta["prediction"] == "eps"


def test_nll_of_the_example_scene_is_what_we_measured(capsys):
    """The default command on the shipped 32x32 scene, every timestep: a golden number (regenerate it
    only when the model changes on purpose: python -m ldm_nodes.tools.goldens), and far below the 8 bits/dim of storing it raw.
    A REGRESSION CHECK (the number is this code's own output); the bound's correctness is tested against
    closed-form float64 oracles in test_likelihood.py."""
    assert nll(PACK / "input" / "shapes_32.png") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unit"] == "bits/dim" and report["model"] == PIXEL
    assert report["images"][0]["nll"] == pytest.approx(recorded_nll(), abs=2e-3)


def test_a_scene_costs_fewer_bits_than_uniform_noise(tmp_path, capsys):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    assert nll(PACK / "input" / "shapes_32.png", noise, "--steps", "50") == 0
    scene, noise = (r["nll"] for r in json.loads(capsys.readouterr().out)["images"])
    assert scene < 8 < noise
