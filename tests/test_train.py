"""The trainer: losses fall, runs resume exactly, saved models load, settings are guarded."""
import copy
import json
from dataclasses import replace

import pytest
import torch

from ldm_nodes.core import train, train_loop, train_stages
from ldm_nodes.core import checkpoint
from ldm_nodes.core.autoencoder import AutoencoderConfig, IdentityAutoencoder
from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.data import downsample, make_dataset
from ldm_nodes.core.datasets import TensorImages
from ldm_nodes.core.families import FAMILIES
from ldm_nodes.core.objective import q_sample
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig
from ldm_nodes.core.transformer import TransformerConfig, TransformerModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16)
TEXT = CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64)
SCHEDULE = TrainingSchedule("scaled_linear")


@pytest.fixture(scope="module")
def data():
    images, captions = make_dataset(64, seed=5)
    return images[:, :, ::4, ::4].contiguous(), captions  # 16x16 keeps the test fast


def dataset(images, captions=None):
    return TensorImages(images, captions or [""] * len(images), {"data": "test"})


def recipe(out, **kw):
    return train.Recipe(str(out), **{"vae_steps": 0, "save_every": 1, **kw})


def fresh():
    return UNetModel(UNET), train.CLIPTextModel(TEXT)


def options(tmp_path, steps, **kw):
    return train.RunOptions(str(tmp_path), steps, batch_size=8, lr=1e-3, warmup=5, save_every=5, log_every=100, **kw)


def reconstruction_error(vae, images):
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        return (vae.decode(vae.encode(x).mode()) - x).abs().mean().item()


def test_autoencoder_loss_falls(tmp_path, data):
    images, _ = data
    torch.manual_seed(0)
    before = reconstruction_error(train.AutoencoderKL(VAE), images)  # the same init train_autoencoder makes
    vae, _ = train.train_autoencoder(options(tmp_path, 60), VAE, dataset(images), ema_decay=0.9)
    after = reconstruction_error(vae, images)
    assert after < 0.85 * before, (before, after)


def denoiser_loss(unet, text, vae, images, captions):
    """L_simple on fixed timesteps and noise, so before and after compare like with like."""
    g = torch.Generator().manual_seed(99)
    ids, _ = train_stages.caption_ids(captions)
    with torch.no_grad():
        z0 = vae.encode(images.float() / 127.5 - 1).mode() * vae.config.scale_factor
        t = torch.randint(0, 1000, (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        x_t = q_sample(z0, SCHEDULE.alpha_bar[t], eps)
        return (unet(x_t, t.float(), text(ids)) - eps).square().mean().item()


def test_denoiser_loss_falls_and_caption_dropout_uses_the_empty_prompt(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 10), VAE, dataset(images))
    torch.manual_seed(0)
    fresh_unet, fresh_text = UNetModel(UNET), train.CLIPTextModel(TEXT)
    unet, text, vae, _ = train.train_denoiser(options(tmp_path, 40), vae, copy.deepcopy(fresh_unet),
                                              copy.deepcopy(fresh_text), dataset(images, captions), SCHEDULE)
    before = denoiser_loss(fresh_unet, fresh_text, vae, images, captions)
    after = denoiser_loss(unet, text, vae, images, captions)
    assert after < 0.8 * before, (before, after)
    ids, empty = train_stages.caption_ids(captions)
    assert empty.tolist()[:3] == [49406, 49407, 49407] and ids.shape == (len(captions), 77)


def test_scale_factor_whitens_the_latents(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 5), VAE, dataset(images))
    _, _, vae, _ = train.train_denoiser(options(tmp_path, 1), vae, *fresh(), dataset(images, captions), SCHEDULE)
    mean, std = train_stages.encode_dataset(vae, images, "cpu")
    z = vae.config.scale_factor * (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)))
    assert z.std().item() == pytest.approx(1.0, abs=0.02)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, data):
    images, _ = data
    whole, _ = train.train_autoencoder(options(tmp_path / "whole", 12), VAE, dataset(images))
    train.train_autoencoder(options(tmp_path / "split", 6), VAE, dataset(images))  # stops at 6 (state saved at 5 and 6)
    resumed, _ = train.train_autoencoder(options(tmp_path / "split", 12), VAE, dataset(images))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resumed_run_goes_on_with_the_smoothed_loss_curve_and_adds_up_its_time(tmp_path, data):
    """No spike at a resume: the smoothed loss continues from the saved one, so the curve is the one an
    uninterrupted run draws; the stage's time is summed over the runs."""
    images, _ = data

    def curve(out, steps):
        opts = train.RunOptions(str(out), steps, batch_size=8, lr=1e-3, warmup=5, save_every=3, log_every=1)
        return train.train_autoencoder(opts, VAE, dataset(images))

    curve(tmp_path / "whole", 9)
    curve(tmp_path / "split", 6)
    curve(tmp_path / "split", 9)
    whole, split = (json.loads(train.state_metadata(tmp_path / name / "autoencoder-state.safetensors")["history"])
                    for name in ("whole", "split"))
    assert [row[0] for row in split["loss"]] == list(range(1, 10))
    assert split["loss"] == whole["loss"]
    assert split["wall_time_s"] > 0 and split["smoothed_loss"] == whole["smoothed_loss"]


def test_resume_refuses_other_settings(tmp_path, data):
    images, _ = data
    train.train_autoencoder(options(tmp_path, 5), VAE, dataset(images))
    other = train.RunOptions(str(tmp_path), 10, batch_size=4, lr=1e-3, warmup=5, save_every=5)
    with pytest.raises(ValueError, match="other settings.*batch_size"):
        train.train_autoencoder(other, VAE, dataset(images))


def test_saved_model_loads_with_its_record(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 3), VAE, dataset(images))
    train.save_autoencoder(tmp_path / "ae.safetensors", vae)
    again = train.load_autoencoder(tmp_path / "ae.safetensors")
    assert again.config == vae.config
    unet, text, vae, loss = train.train_denoiser(options(tmp_path, 3), vae, *fresh(), dataset(images, captions), SCHEDULE)
    train.save_model(tmp_path / "m.safetensors", unet, vae, text, SCHEDULE, "v", {"steps": 3})
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert ck.prediction == "v" and ck.vae.config.scale_factor == vae.config.scale_factor
    assert {p.dtype for p in ck.denoiser.parameters()} == {torch.float32}  # fp16 on disk, fp32 when loaded
    with torch.no_grad():
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)
        torch.testing.assert_close(ck.denoiser(x, t, ctx), unet.half().float()(x, t, ctx), rtol=1e-3, atol=1e-3)


def test_long_captions_are_refused():
    with pytest.raises(ValueError, match="longer than 75 tokens"):
        train_stages.caption_ids(["word " * 80])


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    opts = train.RunOptions("unused", steps=1000, lr=1.0, warmup=100)
    rates = [train_loop.learning_rate(opts, step) for step in range(1000)]
    assert rates[0] == pytest.approx(0.01) and rates[99] == pytest.approx(1.0)
    assert rates[550] == pytest.approx(0.55, abs=0.01)  # halfway through the decay: 0.1 + 0.9 / 2
    # a quarter and three quarters through, where cosine (0.1 + 0.45 (1 + cos(pi p))) and linear decay
    # (0.775, 0.325) differ: the midpoint alone cannot tell them apart
    assert rates[325] == pytest.approx(0.8682, abs=1e-3) and rates[775] == pytest.approx(0.2318, abs=1e-3)
    assert rates[-1] == pytest.approx(0.1, abs=1e-4)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))


def test_decoder_finetune_keeps_the_encoder_and_improves_reconstruction(tmp_path, data):
    images, _ = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 10), VAE, dataset(images))
    encoder = copy.deepcopy(vae.encoder.state_dict())
    before = reconstruction_error(vae, images)
    tuned, _ = train.finetune_decoder(options(tmp_path, 40), copy.deepcopy(vae), dataset(images), ema_decay=0.9)
    for k, v in tuned.encoder.state_dict().items():
        assert torch.equal(v, encoder[k]), k
    assert torch.equal(tuned.quant_conv.weight, vae.quant_conv.weight)
    assert reconstruction_error(tuned, images) < 0.97 * before


def test_transformer_with_a_frozen_text_encoder_learns(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 5), VAE, dataset(images))
    torch.manual_seed(0)
    config = TransformerConfig(4, 4, 64, 2, 2, 32, base_size=4)
    fresh_net, text = TransformerModel(config), train.CLIPTextModel(TEXT)
    frozen = copy.deepcopy(text.state_dict())
    net, text, vae, _ = train.train_denoiser(options(tmp_path, 40), vae, copy.deepcopy(fresh_net), text,
                                             dataset(images, captions), SCHEDULE, train_text=False)
    for k, v in text.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    before = denoiser_loss(fresh_net, text, vae, images, captions)
    after = denoiser_loss(net, text, vae, images, captions)
    assert after < 0.8 * before, (before, after)


def test_pixel_space_trains_on_images_in_minus_one_one(tmp_path, data):
    images, captions = data
    vae = IdentityAutoencoder()
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16))
    fresh_unet, text = copy.deepcopy(unet), train.CLIPTextModel(TEXT)
    fresh_text = copy.deepcopy(text)
    unet, text, vae, _ = train.train_denoiser(options(tmp_path, 40), vae, unet, text, dataset(images, captions), SCHEDULE)
    assert vae.config.scale_factor == 1.0
    before = denoiser_loss(fresh_unet, fresh_text, vae, images, captions)
    after = denoiser_loss(unet, text, vae, images, captions)
    assert after < 0.8 * before, (before, after)


def test_downsample_box_filters():
    images, _ = make_dataset(2, seed=1)
    small = downsample(images, 32)
    assert small.shape == (2, 3, 32, 32) and small.dtype == torch.uint8
    expected = images[:, :, :2, :2].float().mean(dim=(2, 3)).round()
    assert torch.equal(small[:, :, 0, 0].float(), expected)
    with pytest.raises(ValueError, match="resolution 48"):
        downsample(images, 48)


def test_a_model_on_a_builtin_base_holds_only_its_denoiser(tmp_path, data, monkeypatch):
    """train_model with base=builtin/...: the file refers to the base for the text encoder and the
    autoencoder (pixel space: the text encoder only) and loads back whole."""
    images, captions = data
    builtin = tmp_path / "models"
    builtin.mkdir()
    monkeypatch.setitem(checkpoint.PART_SOURCES, "builtin/", builtin)
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 3), VAE, dataset(images))
    unet, text = fresh()
    train.save_model(builtin / "base.safetensors", unet, vae, text, SCHEDULE, "eps", {})
    monkeypatch.setitem(FAMILIES, "transformer", replace(FAMILIES["transformer"], tiny=TransformerConfig(4, 4, 32, 1, 1, 32, base_size=4)))
    monkeypatch.setattr(train, "TINY_PIXEL_UNET", UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16))
    base = train.ModelRef(builtin / "base.safetensors", "builtin/base.safetensors")
    for denoiser, pixel, shared in (("transformer", False, {"text", "vae"}), ("unet", True, {"text"})):
        out = tmp_path / f"{denoiser}-{pixel}"
        path = train.train_model(recipe(out, steps=2, batch_size=4, denoiser=denoiser, pixel=pixel, base=base),
                                 dataset(images, captions))
        meta = checkpoint.read_model_metadata(path)
        assert set(meta["parts_from"]) == shared and meta["training"]["base"] == "builtin/base.safetensors"
        ck = load_checkpoint(path)
        assert isinstance(ck.denoiser, TransformerModel if denoiser == "transformer" else UNetModel)
        assert isinstance(ck.vae, IdentityAutoencoder) == pixel
        assert ck.schedule == (train.PIXEL_SCHEDULE if pixel else train.TINY_SCHEDULE)
        assert torch.equal(ck.text_encoder.text_model.embeddings.token_embedding.weight,
                           text.text_model.embeddings.token_embedding.weight.half().float())
        record = json.loads((out / "record.json").read_text())
        assert record["denoiser"] == denoiser and "vae_steps" not in record  # no autoencoder stage ran here


def test_init_starts_the_denoiser_from_a_trained_model(tmp_path, data, monkeypatch):
    """--init: the run starts from that model's denoiser (with no steps the result is the same weights),
    keeps its training record, refuses a denoiser that does not fit, and a resume with another init."""
    images, captions = data
    builtin = tmp_path / "models"
    builtin.mkdir()
    monkeypatch.setitem(checkpoint.PART_SOURCES, "builtin/", builtin)
    monkeypatch.setitem(FAMILIES, "transformer", replace(FAMILIES["transformer"], tiny=TransformerConfig(4, 4, 32, 1, 1, 32, base_size=4)))
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 3), VAE, dataset(images))
    unet, text = fresh()
    train.save_model(builtin / "base.safetensors", unet, vae, text, SCHEDULE, "eps", {})
    base = train.ModelRef(builtin / "base.safetensors", "builtin/base.safetensors")
    data = dataset(images, captions)
    first = train.train_model(recipe(tmp_path / "first", steps=2, batch_size=4, denoiser="transformer", base=base), data)
    init = train.ModelRef(first, "first.safetensors")
    path = train.train_model(recipe(tmp_path / "again", steps=0, batch_size=4, denoiser="transformer", base=base,
                                    init=init, seed=1), data)
    started, trained = load_checkpoint(first).denoiser.state_dict(), load_checkpoint(path).denoiser.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in started.items())
    record = checkpoint.read_model_metadata(path)["training"]
    assert record["init"] == {"model": "first.safetensors", "training": checkpoint.read_model_metadata(first)["training"]}
    assert record["init"]["training"]["steps"] == 2 and record["steps"] == 0
    with pytest.raises(ValueError, match="--init base.safetensors: its denoiser is a UNetModel.*needs a TransformerModel"):
        train.train_model(recipe(tmp_path / "mismatch", steps=1, batch_size=4, denoiser="transformer", base=base,
                                 init=train.ModelRef(builtin / "base.safetensors", "base.safetensors")), data)
    monkeypatch.setattr(train, "TINY_AUTOENCODER", VAE)
    with pytest.raises(ValueError, match="--init base.safetensors: its denoiser is a UNetModel"):  # before stage 1
        train.train_model(recipe(tmp_path / "no-base", vae_steps=1, steps=1, batch_size=4, vae_batch_size=4,
                                 denoiser="transformer",
                                 init=train.ModelRef(builtin / "base.safetensors", "base.safetensors")), data)
    assert not (tmp_path / "no-base").exists() or not any((tmp_path / "no-base").iterdir())
    train.train_model(recipe(tmp_path / "resume", steps=1, batch_size=4, denoiser="transformer", base=base,
                             init=init), data)
    with pytest.raises(ValueError, match="other settings.*init"):
        train.train_model(recipe(tmp_path / "resume", steps=2, batch_size=4, denoiser="transformer", base=base,
                                 init=train.ModelRef(path, "again.safetensors")), data)


def test_held_out_bound_is_reported_at_every_save(tmp_path, data, capsys):
    """Pixel space: the report is the strided bound in bits/dim of the held-out images, the same
    number held_out_bound gives for the network as it was at that save."""
    images, captions = data
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16))
    text = train.CLIPTextModel(TEXT)
    held = (images[:4], captions[:4])
    unet, text, vae, _ = train.train_denoiser(options(tmp_path, 10), IdentityAutoencoder(), unet, text,
                                              dataset(images, captions), SCHEDULE, held_out=held, ema_decay=0.0)
    reports = [line for line in capsys.readouterr().err.splitlines() if ": bound " in line]
    assert [r.split(":")[0] for r in reports] == ["denoiser 5", "denoiser 10"]
    assert all("bits/dim on 4 held-out images" in r for r in reports)
    last = train_stages.held_out_bound(unet, text, vae, SCHEDULE, "eps", *held)
    assert f"bound {last.total.mean():.4f}" in reports[-1]


def test_resume_refuses_another_frozen_text_encoder(tmp_path, data):
    images, captions = data
    vae = IdentityAutoencoder()
    unet = UNetModel(UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16))
    torch.manual_seed(0)
    text = train.CLIPTextModel(TEXT)
    train.train_denoiser(options(tmp_path, 5), vae, copy.deepcopy(unet), copy.deepcopy(text),
                         dataset(images, captions), SCHEDULE, train_text=False)
    other = copy.deepcopy(text)
    with torch.no_grad():
        other.text_model.final_layer_norm.bias.add_(0.01)
    with pytest.raises(ValueError, match="other settings.*text_digest"):
        train.train_denoiser(options(tmp_path, 10), vae, copy.deepcopy(unet), other, dataset(images, captions),
                             SCHEDULE, train_text=False)


def test_autoencoder_stages_are_trained_once_then_reused(tmp_path, data, monkeypatch, capsys):
    images, captions = data
    monkeypatch.setattr(train, "TINY_AUTOENCODER", VAE)
    run = recipe(tmp_path, vae_steps=2, steps=1, batch_size=4, vae_batch_size=4, decoder_steps=2)
    train.train_model(run, dataset(images, captions))
    first = json.loads((tmp_path / "record.json").read_text())
    assert first["final_autoencoder_loss"] is not None and first["final_decoder_loss"] is not None
    stage1 = train.load_autoencoder(tmp_path / "autoencoder.safetensors")
    tuned = train.load_autoencoder(tmp_path / "autoencoder-decoder.safetensors")
    assert torch.equal(stage1.encoder.conv_in.weight, tuned.encoder.conv_in.weight)
    assert not torch.equal(stage1.decoder.conv_out.weight, tuned.decoder.conv_out.weight)
    capsys.readouterr()
    train.train_model(run, dataset(images, captions))
    err = capsys.readouterr().err
    assert "autoencoder: using" in err and "decoder: using" in err
    again = json.loads((tmp_path / "record.json").read_text())  # the reused stages keep their record
    for key in ("final_autoencoder_loss", "final_decoder_loss", "autoencoder_curves", "decoder_curves"):
        assert again[key] == first[key] and again[key] is not None, key
    assert again["training_time_s"] >= first["training_time_s"]


def test_train_command_names_a_missing_init_model(tmp_path, capsys):
    from ldm_nodes.cli import main

    assert main(["train", "--out", str(tmp_path), "--init", "builtin/no-such.safetensors"]) == 1
    assert capsys.readouterr().err.startswith("error: --init: ")


def test_train_command_takes_another_runs_model_file_as_init(tmp_path):
    """--init by path (a run's own model.safetensors is in no model folder): one step from the shipped
    transformer's weights, and the record names the file."""
    from ldm_nodes.cli import main
    from ldm_nodes.nodes.model_paths import resolve_model

    init = str(resolve_model("builtin/tiny-shapes-transformer.safetensors"))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--base", "builtin/tiny-shapes.safetensors", "--init", init,
                 "--denoiser", "transformer", "--images", "8", "--steps", "1", "--batch-size", "2"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["init"]["model"] == init and record["init"]["training"]["denoiser"] == "transformer"


def test_gradient_checkpointing_gives_the_same_gradients_and_keys():
    torch.manual_seed(0)
    unet = UNetModel(UNET)
    checkpointed = copy.deepcopy(unet)
    train.checkpoint_blocks(checkpointed)
    assert checkpointed.state_dict().keys() == unet.state_dict().keys()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 77, 32)
    for module in (unet, checkpointed):
        module(x, t, context).square().mean().backward()
    for (name, a), b in zip(unet.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_train_help_gives_every_flag_a_help_line_and_its_default(capsys):
    import re

    from ldm_nodes.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    options = capsys.readouterr().out.split("options:")[1]
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    flags = [re.match(r"\s*(-\S+)", b).group(1) for b in blocks]
    assert {"--data", "--resolution", "--val", "--cache-latents", "--init", "--workers"} <= set(flags)
    for block in blocks[1:]:  # after -h
        assert "(default:" in block and len(" ".join(block.split()[2:])) > 20, block
