"""Training on a folder of the user's images: captions, cropping, the held-out split, the latent cache,
and the trained model in use through `run` by its path."""
import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_nodes
from ldm_nodes.cli import main
from ldm_nodes.core import train
from ldm_nodes.core.autoencoder import AutoencoderConfig
from ldm_nodes.core.datasets import materialise, scan_folder, split_held_out, square_crop
from ldm_nodes.core.families import FAMILIES
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.nodes import model_paths


def stripes(path, size, seed, mode="RGB"):
    """A picture that is not one of the procedural shapes: random sinusoidal stripes."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    f = rng.uniform(0.1, 0.5, 3)
    rgb = np.stack([np.sin(f[0] * x), np.sin(f[1] * y), np.sin(f[2] * (x + y))], -1) * 0.5 + 0.5
    Image.fromarray((rgb * 255).astype(np.uint8)).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    for i, (ext, mode) in enumerate([("png", "RGB"), ("jpg", "L"), ("webp", "RGB"), ("png", "RGBA"), ("png", "P"),
                                     ("jpg", "RGB")]):
        stripes(root / f"p{i}.{ext}", (40 + 7 * i, 60 - 3 * i), i, mode)
    (root / "p0.txt").write_text("red stripes\n")
    (root / "p1.txt").write_text("grey waves")
    (root / "metadata.jsonl").write_text('{"file_name": "p2.webp", "text": "diagonal bands"}\n\n'
                                         '{"file_name": "p1.jpg", "text": "the .txt wins"}\n')
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.md").write_text("not an image")
    return root


def test_scan_reads_captions_skips_broken_files_and_counts_the_uncaptioned(folder):
    scan = scan_folder(folder, 32)
    names = [Path(f).name for f in scan.dataset.files]
    assert names == ["p0.png", "p1.jpg", "p2.webp", "p3.png", "p4.png", "p5.jpg"]
    assert scan.dataset.captions == ["red stripes", "grey waves", "diagonal bands", "", "", ""]
    assert scan.uncaptioned == 3 and [name for name, _ in scan.unreadable] == ["broken.jpg"]
    for i in range(len(names)):
        image, index = scan.dataset[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and index == i


def test_square_crop_resizes_the_short_side_and_keeps_the_center():
    """Against Pillow's own antialiased bilinear resize, then a center crop."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    ours = square_crop(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, 20)
    resized = np.asarray(Image.fromarray(pixels).resize((30, 20), Image.Resampling.BILINEAR), dtype=np.float64)
    want = resized[:, 5:25].transpose(2, 0, 1)
    assert ours.shape == (3, 20, 20)
    assert np.abs(ours.numpy() - want).mean() < 3 and np.abs(ours.numpy() - want).max() < 40
    small = square_crop(torch.rand(3, 10, 14), 20)  # enlarged when smaller than the resolution
    assert small.shape == (3, 20, 20)


def test_held_out_split_is_fixed_and_disjoint(folder):
    dataset = scan_folder(folder, 32).dataset
    train_set, held = split_held_out(dataset, 2, seed=0)
    again, held_again = split_held_out(dataset, 2, seed=0)
    assert held.files == held_again.files and train_set.files == again.files
    assert len(held) == 2 and len(train_set) == 4 and not set(held.files) & set(train_set.files)
    assert split_held_out(dataset, 0, seed=0) == (dataset, None)
    assert len(split_held_out(dataset, 100, seed=0)[1]) == 3  # never more held out than trained on
    assert materialise(held).shape == (2, 3, 32, 32)


VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16)
TEXT = CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64)


def test_cached_latents_train_the_same_model_as_encoding_every_step(folder, tmp_path):
    """--cache-latents changes when the frozen autoencoder runs, not what the denoiser sees: with --flip, the
    cache holds both orientations and the same draws pick them."""
    dataset = scan_folder(folder, 32).dataset
    torch.manual_seed(0)
    vae, unet, text = train.AutoencoderKL(VAE).eval(), UNetModel(UNET), train.CLIPTextModel(TEXT)
    results = []
    for cache in (False, True):
        opts = train.RunOptions(str(tmp_path / str(cache)), 3, batch_size=4, lr=1e-3, warmup=1, save_every=3,
                                flip=True)
        net, *_ = train.train_denoiser(opts, copy.deepcopy(vae), copy.deepcopy(unet), copy.deepcopy(text), dataset,
                                       TrainingSchedule("scaled_linear"), cache_latents=cache)
        results.append(net.state_dict())
    (cached,) = (tmp_path / "True").glob("latents-*.npy")
    (tmp_path / "True" / "denoiser-state.safetensors").unlink()  # the same folder, another batch size:
    opts = train.RunOptions(str(tmp_path / "True"), 1, batch_size=2, lr=1e-3, warmup=1, save_every=3, flip=True)
    train.train_denoiser(opts, copy.deepcopy(vae), copy.deepcopy(unet), copy.deepcopy(text), dataset,
                         TrainingSchedule("scaled_linear"), cache_latents=True)
    assert list((tmp_path / "True").glob("latents-*.npy")) == [cached]  # the same latents, reused
    opts = train.RunOptions(str(tmp_path / "True"), 1, batch_size=2, lr=1e-3, warmup=1, save_every=3)
    (tmp_path / "True" / "denoiser-state.safetensors").unlink()
    train.train_denoiser(opts, copy.deepcopy(vae), copy.deepcopy(unet), copy.deepcopy(text), dataset,
                         TrainingSchedule("scaled_linear"), cache_latents=True)
    (other,) = (tmp_path / "True").glob("latents-*.npy")  # no flip: other latents, and the old file gone
    assert other != cached
    moved = 0
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-4, atol=1e-5)
        moved += not torch.equal(v, unet.state_dict()[k])
    assert moved > 0


def test_a_model_trained_on_a_folder_runs_by_its_path(folder, tmp_path, monkeypatch):
    """train --data, then `run` with ckpt_name = the model file's path; the record keeps both curves
    and the run folder has the plot."""
    monkeypatch.setattr(train, "TINY_AUTOENCODER", VAE)
    monkeypatch.setitem(FAMILIES, "unet", replace(FAMILIES["unet"], tiny=UNET))
    monkeypatch.setattr(train, "TINY_TEXT", TEXT)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--out", str(out), "--resolution", "32", "--vae-steps", "2",
                 "--steps", "4", "--save-every", "2", "--batch-size", "2", "--vae-batch-size", "2", "--val", "2",
                 "--workers", "0", "--cache-latents"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["images"] == 4 and record["held_out"] == 2 and record["skipped_images"] == 1
    assert [row[0] for row in record["curves"]["held_out_bound"]] == [2, 4]
    assert record["curves"]["unit"] == "nats/dim (latent)"
    assert Image.open(out / "training.png").size[1] > Image.open(out / "training.png").size[0] / 2  # two panels
    workflow = Path(ldm_nodes.__file__).parent / "workflows" / "api" / "txt2img.json"
    images, saved = tmp_path / "images", list(model_paths._model_dirs)
    try:
        assert main(["run", str(workflow), "--out", str(images), "--set", f"1.ckpt_name={out / 'model.safetensors'}",
                     "--set", "5.width=32", "--set", "5.height=32", "--set", "4.steps=2",
                     "--set", "2.text=red stripes"]) == 0
    finally:
        model_paths.set_model_dirs(saved)  # `run` allowed file paths for this process
    (png,) = images.glob("*.png")
    assert Image.open(png).size == (32, 32)


def transparent_folder(root, count=4):
    """RGBA pictures whose transparent half hides pure green (what an icon's edges smear into hiding)."""
    root.mkdir()
    for i in range(count):
        rgba = np.zeros((40, 40, 4), dtype=np.uint8)
        rgba[..., 1] = 255  # pure green everywhere, hidden where alpha is 0
        rgba[10:30, 10:30] = (200, 40, 40, 255)  # an opaque red square
        rgba[12:16, 12:16, 3] = 128  # and a half-transparent corner
        Image.fromarray(rgba, "RGBA").save(root / f"icon{i}.png")
        (root / f"icon{i}.txt").write_text(f"red square {i}")
    # a palette picture whose transparent index is green: Pillow warns when it is converted to RGB
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([200, 40, 40, 0, 255, 0] + [0] * 762)
    palette.paste(0, (10, 10, 30, 30))
    palette.save(root / "palette.png", transparency=bytes([255, 0] + [255] * 254))
    return root


def green(images):
    """The pixels, of uint8 [N, 3, H, W], where green stands out: the hidden colour showing through."""
    r, g, b = images.int().unbind(1)
    return int(((g > r + 60) & (g > b + 60)).sum())


def test_transparent_pictures_are_laid_over_the_background_so_the_hidden_green_never_shows(tmp_path, recwarn):
    scan = scan_folder(transparent_folder(tmp_path / "icons"), 32)
    images = materialise(scan.dataset)
    assert len(images) == 5 and green(images) == 0
    assert (images[:, :, 0, 0] == 255).all()  # the transparent corner is white
    assert not [w for w in recwarn if "Transparency" in str(w.message)]  # Pillow's palette warning is not raised
    black = materialise(scan_folder(tmp_path / "icons", 32, background=(0.0, 0.0, 0.0)).dataset)
    assert (black[:, :, 0, 0] == 0).all() and green(black) == 0
    center = images[:4, :, 16, 16].float()  # the opaque square is untouched
    assert (center - torch.tensor([200.0, 40.0, 40.0])).abs().max() <= 2


def test_dry_run_draws_the_pictures_the_trainer_sees_and_trains_nothing(tmp_path, capsys):
    icons = transparent_folder(tmp_path / "icons")
    out = tmp_path / "out"
    assert main(["train", "--data", str(icons), "--out", str(out), "--resolution", "32", "--val", "1",
                 "--workers", "0", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "dry run" in err and "nothing trained" in err
    assert sorted(p.name for p in out.iterdir()) == ["data.png"]  # no state, no lock left
    sheet = np.asarray(Image.open(out / "data.png").convert("RGB"))
    r, g, b = (sheet[..., k].astype(int) for k in range(3))
    assert not ((g > r + 60) & (g > b + 60)).any()  # no green anywhere in the grid
    assert ((r > 150) & (g < 80)).sum() > 3 * 48 * 48  # the red squares, drawn at 3x
    assert main(["train", "--data", str(icons), "--out", str(tmp_path / "green"), "--resolution", "32",
                 "--background", "#00ff00", "--val", "1", "--workers", "0", "--dry-run"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "green" / "data.png").convert("RGB")).astype(int)
    assert ((sheet[..., 1] > 200) & (sheet[..., 0] < 50)).any()  # a chosen background shows as chosen
