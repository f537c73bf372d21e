"""The trainer: losses fall, runs resume exactly, saved models load, settings are guarded."""
import pytest
import torch

from ldm_nodes.core import train
from ldm_nodes.core.autoencoder import AutoencoderConfig
from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.data import make_dataset
from ldm_nodes.core.objective import q_sample
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig
from ldm_nodes.core.unet import UNetConfig

VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16)
TEXT = CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64)
SCHEDULE = TrainingSchedule("scaled_linear")


@pytest.fixture(scope="module")
def data():
    images, captions = make_dataset(64, seed=5)
    return images[:, :, ::2, ::2].contiguous(), captions  # 32x32 keeps the test fast



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
    vae, _ = train.train_autoencoder(options(tmp_path, 60), VAE, images, ema_decay=0.9)
    after = reconstruction_error(vae, images)
    assert after < 0.85 * before, (before, after)


def denoiser_loss(unet, text, vae, images, captions):
    """L_simple on fixed timesteps and noise, so before and after compare like with like."""
    g = torch.Generator().manual_seed(99)
    ids, _ = train.caption_ids(captions)
    with torch.no_grad():
        z0 = vae.encode(images.float() / 127.5 - 1).mode() * vae.config.scale_factor
        t = torch.randint(0, 1000, (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        x_t = q_sample(z0, SCHEDULE.alpha_bar[t], eps)
        return (unet(x_t, t.float(), text(ids)) - eps).square().mean().item()


def test_denoiser_loss_falls_and_caption_dropout_uses_the_empty_prompt(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 10), VAE, images)
    torch.manual_seed(0)
    fresh_unet, fresh_text = train.UNetModel(UNET), train.CLIPTextModel(TEXT)
    unet, text, vae, _ = train.train_denoiser(options(tmp_path, 40), vae, UNET, TEXT, images, captions, SCHEDULE)
    before = denoiser_loss(fresh_unet, fresh_text, vae, images, captions)
    after = denoiser_loss(unet, text, vae, images, captions)
    assert after < 0.8 * before, (before, after)
    ids, empty = train.caption_ids(captions)
    assert empty.tolist()[:3] == [49406, 49407, 49407] and ids.shape == (len(captions), 77)


def test_scale_factor_whitens_the_latents(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 5), VAE, images)
    _, _, vae, _ = train.train_denoiser(options(tmp_path, 1), vae, UNET, TEXT, images, captions, SCHEDULE)
    mean, std = train.encode_dataset(vae, images, "cpu")
    z = vae.config.scale_factor * (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)))
    assert z.std().item() == pytest.approx(1.0, abs=0.02)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, data):
    images, _ = data
    whole, _ = train.train_autoencoder(options(tmp_path / "whole", 12), VAE, images)
    train.train_autoencoder(options(tmp_path / "split", 6), VAE, images)  # stops at 6 (state saved at 5 and 6)
    resumed, _ = train.train_autoencoder(options(tmp_path / "split", 12), VAE, images)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings(tmp_path, data):
    images, _ = data
    train.train_autoencoder(options(tmp_path, 5), VAE, images)
    other = train.RunOptions(str(tmp_path), 10, batch_size=4, lr=1e-3, warmup=5, save_every=5)
    with pytest.raises(ValueError, match="other settings.*batch_size"):
        train.train_autoencoder(other, VAE, images)


def test_saved_model_loads_with_its_record(tmp_path, data):
    images, captions = data
    vae, _ = train.train_autoencoder(options(tmp_path / "vae", 3), VAE, images)
    train.save_autoencoder(tmp_path / "ae.safetensors", vae)
    again = train.load_autoencoder(tmp_path / "ae.safetensors")
    assert again.config == vae.config
    unet, text, vae, loss = train.train_denoiser(options(tmp_path, 3), vae, UNET, TEXT, images, captions, SCHEDULE)
    train.save_model(tmp_path / "m.safetensors", unet, vae, text, SCHEDULE, "v", {"steps": 3})
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert ck.prediction == "v" and ck.vae.config.scale_factor == vae.config.scale_factor
    assert {p.dtype for p in ck.unet.parameters()} == {torch.float32}  # fp16 on disk, fp32 when loaded
    with torch.no_grad():
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)
        torch.testing.assert_close(ck.unet(x, t, ctx), unet.half().float()(x, t, ctx), rtol=1e-3, atol=1e-3)


def test_long_captions_are_refused():
    with pytest.raises(ValueError, match="longer than 75 tokens"):
        train.caption_ids(["word " * 80])


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    opts = train.RunOptions("unused", steps=1000, lr=1.0, warmup=100)
    rates = [train.learning_rate(opts, step) for step in range(1000)]
    assert rates[0] == pytest.approx(0.01) and rates[99] == pytest.approx(1.0)
    assert rates[550] == pytest.approx(0.55, abs=0.01)  # halfway through the decay: 0.1 + 0.9 / 2
    assert rates[-1] == pytest.approx(0.1, abs=1e-4)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))
