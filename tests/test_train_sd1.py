"""Fine-tuning a Stable Diffusion 1.x single-file checkpoint (--init): the UNet trains (the text encoder
with --train-text-encoder), the autoencoder stays frozen, and the result has SD1.5's exact key layout,
which LDMLoadModel and ComfyUI's CheckpointLoaderSimple read. A tiny model of the SD1.5 layout stands
in for the real one."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_nodes.cli import main
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.checkpoint import load_checkpoint, save_checkpoint
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

# SD1.5's structure (levels, blocks, attention, skip connections, 12 text layers) at a small width.
UNET = UNetConfig(4, 4, 64, (1, 2, 3, 3), 2, (0, 1, 2), 1, 64, num_head_channels=64)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
TEXT = CLIPTextConfig(width=64, layers=12, heads=1, mlp_width=128)


def sd15_keys():
    """The tensor names of a real SD1.5 file (the repository's copy of the list)."""
    path = Path(__file__).resolve().parent / "data" / "sd15_keys.txt"
    return {line.split("\t")[0] for line in path.read_text().splitlines()}


def keys(path):
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    """A tiny SD1-layout single file as other tools write it: the three parts, no ldm_nodes metadata."""
    root = tmp_path_factory.mktemp("sd1")
    torch.manual_seed(0)
    ours = root / "ours.safetensors"
    save_checkpoint(ours, UNetModel(UNET), AutoencoderKL(VAE), CLIPTextModel(TEXT),
                    TrainingSchedule("scaled_linear", 1000, 0.00085, 0.012), "eps", dtype=torch.float32)
    path = root / "tiny-sd1.safetensors"
    save_file(load_file(ours), path)  # without our metadata
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (70, 80 + i, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"noise picture {i}")
    return root


def test_the_tiny_stand_in_has_sd15s_key_layout(sd1_file):
    assert keys(sd1_file) == sd15_keys()


def test_fine_tune_trains_the_unet_keeps_the_autoencoder_and_saves_the_sd1_layout(sd1_file, pictures, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--init", str(sd1_file), "--data", str(pictures), "--out", str(out), "--resolution", "64",
                 "--steps", "2", "--batch-size", "2", "--save-every", "2", "--val", "1", "--workers", "0"]) == 0
    model = out / "model.safetensors"
    assert keys(model) == sd15_keys()
    before, after = load_file(sd1_file), load_file(model)
    for key, value in before.items():  # the result is stored in fp16
        assert key.startswith("model.diffusion_model.") or torch.equal(after[key], value.half()), key
    assert any(not torch.equal(after[k], v.half()) for k, v in before.items() if k.startswith("model.diffusion_model."))
    ck = load_checkpoint(model)
    assert ck.prediction == "eps" and ck.schedule.config["beta_schedule"] == "scaled_linear"
    assert ck.vae.config.scale_factor == 0.18215  # SD1's, not refitted
    record = json.loads((out / "record.json").read_text())
    assert record["fine_tune"] == "whole model" and record["init"]["model"] == str(sd1_file)
    assert record["curves"]["held_out_bound"]

    again = tmp_path / "again"  # a second fine-tune of the result, this time with the text encoder
    assert main(["train", "--init", str(model), "--data", str(pictures), "--out", str(again), "--resolution", "64",
                 "--steps", "1", "--batch-size", "2", "--val", "0", "--workers", "0", "--train-text-encoder"]) == 0
    tuned = load_file(again / "model.safetensors")
    assert keys(again / "model.safetensors") == sd15_keys()
    assert any(not torch.equal(tuned[k], v) for k, v in after.items() if k.startswith("cond_stage_model."))
    assert all(torch.equal(tuned[k], v) for k, v in after.items() if k.startswith("first_stage_model."))


def test_fine_tune_refusals_come_before_any_work(sd1_file, pictures, tmp_path, capsys):
    out = tmp_path / "run"
    for extra, flag in ((["--resolution", "32"], "--resolution"), (["--pixel"], "--pixel"),
                        (["--denoiser", "transformer"], "--denoiser"), (["--prediction", "v"], "--prediction")):
        capsys.readouterr()
        assert main(["train", "--init", str(sd1_file), "--data", str(pictures), "--out", str(out), *extra]) == 1
        assert capsys.readouterr().err.startswith(f"error: {flag}")
    sd2 = tmp_path / "sd2.safetensors"
    tensors = load_file(sd1_file)
    tensors["cond_stage_model.model.token_embedding.weight"] = torch.zeros(2, 2)
    save_file(tensors, sd2)
    capsys.readouterr()
    assert main(["train", "--init", str(sd2), "--data", str(pictures), "--out", str(out)]) == 1
    assert "Stable Diffusion 2.x" in capsys.readouterr().err
    assert not out.exists()
