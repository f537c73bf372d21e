"""core/pipeline.py: the noise contract, the start and denoise rules, refusals, latents and images.

The noise tests use a stub network that predicts eps = 0, so D(x) = x: every deterministic
sampler then leaves x where it started and an ancestral one only adds its step noise, which makes
the start x and every draw from the seeded generator visible in the output.
"""
import copy
import math

import pytest
import torch

from ldm_nodes.core import pipeline
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.pipeline import (
    Conditioning, DiffusionModel, ScheduleSpec, TextEncoder, decode_latent, empty_latent, encode_image,
    encode_text, run_sigmas, sample, sampler_options,
)
from ldm_nodes.core.samplers import SAMPLERS
from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from ldm_nodes.core.unet import UNetConfig, UNetModel



SCALE = 0.18215
SHAPE = (2, 4, 6, 6)


class ZeroNet(torch.nn.Module):
    """A 'network' that predicts 0 (eps 0 means D(x) = x)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, context):
        return torch.zeros_like(x)


def stub_model(prediction="eps", schedule=None):
    return DiffusionModel(ZeroNet(), schedule or TrainingSchedule(), prediction, SCALE, 4)


COND = Conditioning(torch.zeros(1, 77, 8), "")


def fresh_noise(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def karras(steps=6, schedule=None):
    return ScheduleSpec("model", steps, "karras").sigmas(schedule or TrainingSchedule())


# ---------------------------------------------------------------------------------------------
# Noise and start (contract)


@pytest.mark.parametrize("seed", [0, 1234, 2**64 - 1])
def test_empty_latent_starts_at_first_draw_times_sqrt_one_plus_sigma0_squared(seed):
    sigmas = karras()
    out = sample(stub_model(), torch.zeros(SHAPE), COND, COND, seed=seed, sampler_name="euler", cfg=5.0, sigmas=sigmas)
    expected = fresh_noise(seed) * math.sqrt(1 + float(sigmas[0]) ** 2) / SCALE
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_starts_from_the_same_x(name):
    """With D(x) = x and no step noise (eta 0 where there is one), every sampler ends where it started."""
    eta = 0.0 if name in ("ddpm", "ddim", "euler_ancestral", "dpmpp_2m_sde") else -1.0
    sigmas = karras(4)
    out = sample(stub_model(), torch.zeros(SHAPE), COND, COND, seed=21, sampler_name=name, cfg=1.0, sigmas=sigmas,
                 eta=eta)
    torch.testing.assert_close(out, fresh_noise(21) * math.sqrt(1 + float(sigmas[0]) ** 2) / SCALE,
                               rtol=1e-5, atol=1e-4)


def test_given_latent_starts_at_latent_plus_first_draw_times_sigma0():
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    sigmas = karras()[3:]  # an img2img run: starts lower down
    out = sample(stub_model(), z, COND, COND, seed=7, sampler_name="euler", cfg=1.0, sigmas=sigmas)
    expected = (z * SCALE + fresh_noise(7) * float(sigmas[0])) / SCALE
    torch.testing.assert_close(out, expected)


def test_start_rule_is_decided_by_any_nonzero_value():
    z = torch.zeros(SHAPE)
    z[1, 2, 3, 4] = 0.5  # one value makes it a given latent
    sigmas = karras()
    out = sample(stub_model(), z, COND, COND, seed=3, sampler_name="heun", cfg=1.0, sigmas=sigmas)
    torch.testing.assert_close(out, (z * SCALE + fresh_noise(3) * float(sigmas[0])) / SCALE)


def test_same_seed_same_latent_other_seed_other_latent():
    torch.manual_seed(0)
    unet = tiny_unet()
    model = DiffusionModel(unet, TrainingSchedule(), "eps", SCALE, 4)
    cond = Conditioning(torch.randn(1, 77, 64), "c")
    z = torch.zeros(1, 4, 8, 8)
    sigmas = karras(3)
    torch.manual_seed(1)  # the global RNG must play no part
    a = sample(model, z, cond, cond, seed=5, sampler_name="euler_ancestral", cfg=1.0, sigmas=sigmas)
    torch.manual_seed(2)
    b = sample(model, z, cond, cond, seed=5, sampler_name="euler_ancestral", cfg=1.0, sigmas=sigmas)
    c = sample(model, z, cond, cond, seed=6, sampler_name="euler_ancestral", cfg=1.0, sigmas=sigmas)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("eta, used", [(-1.0, 1.0), (0.5, 0.5)])
def test_ancestral_step_noise_continues_from_the_same_generator(eta, used):
    seed, sigmas = 31, karras(5)
    out = sample(stub_model(), torch.zeros(SHAPE), COND, COND, seed=seed, sampler_name="euler_ancestral", cfg=1.0,
                 sigmas=sigmas, eta=eta)
    g = torch.Generator("cpu").manual_seed(seed)
    s = [float(v) for v in sigmas]
    x = torch.randn(SHAPE, generator=g) * math.sqrt(1 + s[0] ** 2)
    for sigma, sigma_next in zip(s, s[1:]):
        if sigma_next > 0:
            up = min(sigma_next, used * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
            x = x + up * torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(out, x / SCALE)


def test_sampler_receives_the_generator_right_after_the_initial_noise(monkeypatch):
    seen = {}

    def fake(denoiser, x, sigmas, *, generator=None, callback=None, variance="beta_tilde", eta=1.0):
        seen.update(next_draw=torch.randn(3, generator=generator), variance=variance, eta=eta,
                    sigmas=sigmas, callback=callback)
        return x

    monkeypatch.setattr(pipeline, "get_sampler", lambda name: fake)
    sigmas, marker = karras(), object()
    sample(stub_model(), torch.zeros(SHAPE), COND, COND, seed=11, sampler_name="ddpm", cfg=1.0, sigmas=sigmas, eta=0.3,
           ddpm_variance="beta", callback=marker)
    g = torch.Generator("cpu").manual_seed(11)
    torch.randn(SHAPE, generator=g)
    assert torch.equal(seen["next_draw"], torch.randn(3, generator=g))
    assert (seen["variance"], seen["eta"], seen["callback"]) == ("beta", 0.3, marker)
    assert torch.equal(torch.as_tensor(seen["sigmas"]), sigmas)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_out_of_range_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        sample(stub_model(), torch.zeros(SHAPE), COND, COND, seed=seed, sampler_name="euler", cfg=1.0, sigmas=karras())


def test_ddpm_variance_reaches_the_sampler():
    args = (stub_model(), torch.zeros(SHAPE), COND, COND)
    settings = dict(seed=4, sampler_name="ddpm", cfg=1.0, sigmas=karras(4))
    tilde = sample(*args, **settings, ddpm_variance="beta_tilde")
    beta = sample(*args, **settings, ddpm_variance="beta")
    assert torch.isfinite(tilde).all() and not torch.allclose(tilde, beta)


# ---------------------------------------------------------------------------------------------
# Sampler options


def test_sampler_options():
    assert sampler_options("ddim", -1.0, "beta_tilde") == {}
    assert sampler_options("euler_ancestral", -1.0, "beta") == {}
    assert sampler_options("ddim", 0.0, "beta") == {"eta": 0.0}
    assert sampler_options("dpmpp_2m_sde", 0.7, "beta") == {"eta": 0.7}
    assert sampler_options("ddpm", -1.0, "beta") == {"variance": "beta"}
    assert sampler_options("ddpm", 0.5, "beta_tilde") == {"eta": 0.5, "variance": "beta_tilde"}


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "plms"])
def test_eta_for_a_sampler_without_one_is_refused(name):
    with pytest.raises(ValueError, match="eta"):
        sampler_options(name, 0.5, "beta_tilde")
    with pytest.raises(ValueError, match="eta"):
        sample(stub_model(), torch.zeros(SHAPE), COND, COND, seed=0, sampler_name=name, cfg=1.0, sigmas=karras(),
               eta=0.0)


# ---------------------------------------------------------------------------------------------
# Which sigmas a run visits


@pytest.mark.parametrize("spacing", ["karras", "leading", "trailing"])
def test_denoise_one_runs_the_whole_schedule(spacing):
    model = stub_model(schedule=TrainingSchedule("linear", 500))
    spec = ScheduleSpec("model", 7, spacing)
    expected = sampling_schedule(TrainingSchedule("linear", 500), 7, spacing).sigmas
    assert torch.equal(run_sigmas(model, spec, 1.0), expected)


@pytest.mark.parametrize("spacing", ["karras", "leading", "linspace"])
@pytest.mark.parametrize("steps, denoise, total", [(10, 0.5, 20), (10, 0.6, 16), (10, 0.3, 33), (4, 0.75, 5), (6, 0.99, 6)])
def test_denoise_below_one_keeps_the_tail_of_a_longer_schedule(spacing, steps, denoise, total):
    model = stub_model()
    spec = ScheduleSpec("model", steps, spacing)
    run = run_sigmas(model, spec, denoise)
    assert len(run) == steps + 1 and run[-1] == 0
    assert torch.equal(run, spec.sigmas(model.schedule, total)[-(steps + 1):])


def test_denoise_zero_leaves_the_latent_unchanged():
    model = stub_model()
    run = run_sigmas(model, ScheduleSpec("model", 10, "karras"), 0.0)
    assert len(run) < 2
    z = torch.randn(SHAPE)
    out = sample(model, z, COND, COND, seed=0, sampler_name="euler_ancestral", cfg=1.0, sigmas=run)
    assert torch.equal(out, z)


def test_linked_sigmas_are_used_as_given():
    model = stub_model()
    linked = torch.tensor([3.0, 1.5, 0.2, 0.0])
    run = run_sigmas(model, ScheduleSpec("cosine", 20, "leading"), 1.0, linked)
    assert torch.equal(run, linked.double())
    out = sample(model, torch.zeros(SHAPE), COND, COND, seed=2, sampler_name="euler", cfg=1.0, sigmas=run)
    torch.testing.assert_close(out, fresh_noise(2) * math.sqrt(1 + 9.0) / SCALE)


def test_linked_sigmas_with_denoise_below_one_are_refused():
    with pytest.raises(ValueError, match="denoise"):
        run_sigmas(stub_model(), ScheduleSpec("model", 10, "karras"), 0.5, torch.tensor([2.0, 1.0, 0.0]))


@pytest.mark.parametrize("bad", [[1.0, 2.0, 0.0], [3.0, 1.0, -0.5], [3.0, 3.0, 0.0], [0.0], [2.0, 0.0, 0.0]])
def test_malformed_linked_sigmas_are_refused(bad):
    with pytest.raises(ValueError, match="sigmas"):
        run_sigmas(stub_model(), ScheduleSpec("model", 10, "karras"), 1.0, torch.tensor(bad))


@pytest.mark.parametrize("denoise", [-0.1, 1.5])
def test_denoise_out_of_range_is_refused(denoise):
    with pytest.raises(ValueError, match="denoise"):
        run_sigmas(stub_model(), ScheduleSpec("model", 10, "karras"), denoise)


def test_zero_terminal_snr_is_refused_for_eps_models():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        run_sigmas(stub_model("eps"), ScheduleSpec("model", 5, "karras", zero_terminal_snr=True), 1.0)


@pytest.mark.parametrize("beta_schedule", ["model", "scaled_linear"])
def test_zero_terminal_snr_runs_for_v_models(beta_schedule):
    model = stub_model("v")
    run = run_sigmas(model, ScheduleSpec(beta_schedule, 5, "karras", zero_terminal_snr=True), 1.0)
    assert abs(float(run[0]) - 4096) < 1 and run[-1] == 0
    out = sample(model, torch.zeros(SHAPE), COND, COND, seed=0, sampler_name="euler", cfg=1.0, sigmas=run)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# ScheduleSpec


def test_schedule_model_means_the_models_own_betas():
    own = TrainingSchedule("linear", 500)
    spec = ScheduleSpec("model", 10, "karras")
    assert spec.training(own) == own
    assert torch.equal(spec.sigmas(own), sampling_schedule(own, 10, "karras").sigmas)
    assert not torch.equal(spec.sigmas(own), spec.sigmas(TrainingSchedule()))


def test_named_schedule_uses_the_models_number_of_timesteps():
    spec = ScheduleSpec("cosine", 10, "trailing")
    training = spec.training(TrainingSchedule("linear", 500))
    assert training == TrainingSchedule("cosine", 500)
    assert torch.equal(spec.sigmas(TrainingSchedule("linear", 500)),
                       sampling_schedule(TrainingSchedule("cosine", 500), 10, "trailing").sigmas)
    assert spec.training(None) == TrainingSchedule("cosine", 1000)


def test_schedule_model_without_a_model_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleSpec("model", 10, "karras").sigmas(None)


@pytest.mark.parametrize("kwargs, name", [
    (dict(beta_schedule="sqrt_linear"), "beta_schedule"),
    (dict(beta_schedule="squaredcos_cap_v2"), "beta_schedule"),
    (dict(spacing="simple"), "spacing"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
])
def test_schedule_spec_refusals_name_the_input(kwargs, name):
    args = {"beta_schedule": "model", "steps": 10, "spacing": "karras", **kwargs}
    with pytest.raises(ValueError, match=name):
        ScheduleSpec(**args)


# ---------------------------------------------------------------------------------------------
# Latents and images (an autoencoder with f = 4 and 3 latent channels, so neither is hard-coded)

VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, embed_dim=3, scale_factor=0.5)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = AutoencoderKL(VAE).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_empty_latent(vae):
    z = empty_latent(vae, 48, 32, 2)
    assert z.shape == (2, 3, 8, 12) and z.dtype == torch.float32 and not z.any()


@pytest.mark.parametrize("width, height, name", [(30, 32, "width"), (32, 34, "height")])
def test_empty_latent_refuses_sizes_off_the_grid(vae, width, height, name):
    with pytest.raises(ValueError, match=name):
        empty_latent(vae, width, height, 1)


def test_encode_image_is_the_deterministic_posterior_mean(vae):
    image = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(0))
    z = encode_image(vae, image)
    assert z.shape == (2, 3, 4, 6) and z.dtype == torch.float32
    assert torch.equal(z, encode_image(vae, image))
    with torch.no_grad():
        mean = vae.encode(image.movedim(-1, 1) * 2 - 1).mode()
    torch.testing.assert_close(z, mean)


@pytest.mark.parametrize("shape", [(1, 16, 16, 4), (1, 16, 16, 1), (1, 3, 16, 16), (16, 16, 3),
                                   (1, 18, 16, 3), (1, 16, 30, 3)])
def test_encode_image_refuses_wrong_channels_and_sizes(vae, shape):
    with pytest.raises(ValueError, match="image"):
        encode_image(vae, torch.rand(shape))


def test_decode_latent_gives_images_in_zero_one(vae):
    z = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    image = decode_latent(vae, z)
    assert image.shape == (2, 16, 20, 3) and image.dtype == torch.float32
    with torch.no_grad():
        x = vae.decode(z)
    torch.testing.assert_close(image, ((x + 1) / 2).clamp(0, 1).movedim(1, -1))
    loud = copy.deepcopy(vae)
    with torch.no_grad():
        loud.decoder.conv_out.weight.mul_(1000)  # outputs far outside [-1, 1] are clipped
    image = decode_latent(loud, z)
    assert image.min() == 0 and image.max() == 1 and torch.isfinite(image).all()


def test_decode_latent_tiles_large_latents(vae):
    z = torch.randn(1, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    image = decode_latent(vae, z, tile_above=4)
    assert image.shape == (1, 24, 40, 3) and image.min() >= 0 and image.max() <= 1


def test_decode_latent_refuses_nan(vae):
    z = torch.zeros(1, 3, 4, 4)
    z[0, 0, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        decode_latent(vae, z)


# ---------------------------------------------------------------------------------------------
# Precision and text

UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 64, num_heads=2)


def tiny_unet():
    unet = UNetModel(UNET).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return unet


def test_bfloat16_model_matches_float32_loosely():
    torch.manual_seed(0)
    unet = tiny_unet()
    cond = Conditioning(torch.randn(1, 77, 64), "c")
    uncond = Conditioning(torch.randn(1, 77, 64), "")
    z = torch.zeros(1, 4, 8, 8)
    sigmas = karras(4)
    settings = dict(seed=3, sampler_name="dpmpp_2m", cfg=3.0, sigmas=sigmas)
    full = sample(DiffusionModel(unet, TrainingSchedule(), "eps", SCALE, 4), z, cond, uncond, **settings)
    half_unet = tiny_unet().to(torch.bfloat16)
    half_unet.load_state_dict(unet.state_dict())
    half = sample(DiffusionModel(half_unet, TrainingSchedule(), "eps", SCALE, 4), z, cond, uncond, **settings)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float((half - full).norm() / full.norm()) < 0.05


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return TextEncoder(CLIPTextModel(CLIPTextConfig(width=64, layers=1, heads=2, mlp_width=128)).eval(), CLIPTokenizer())


@pytest.mark.parametrize("words, length", [(0, 77), (75, 77), (76, 154), (100, 154), (151, 231)])
def test_encode_text_context_length_in_77_token_chunks(text_encoder, words, length):
    text = " ".join(["circle"] * words)  # one token each
    assert len(text_encoder.tokenizer.encode(text)) == words
    c = encode_text(text_encoder, text)
    assert isinstance(c, Conditioning) and c.text == text
    assert c.context.shape == (1, length, 64)


# ---------------------------------------------------------------------------------------------
# Pixel space: the identity autoencoder goes through the same functions


def test_identity_autoencoder_through_the_latent_functions():
    from ldm_nodes.core.autoencoder import IdentityAutoencoder
    from ldm_nodes.core.preview import fit_latent_to_rgb
    vae = IdentityAutoencoder()
    assert empty_latent(vae, 24, 16, 2).shape == (2, 3, 16, 24)  # f = 1: any size
    image = torch.randint(0, 256, (2, 16, 24, 3)).float() / 255
    latent = encode_image(vae, image)
    torch.testing.assert_close(latent, image.movedim(-1, 1) * 2 - 1)
    torch.testing.assert_close(decode_latent(vae, latent), image)
    a, b = fit_latent_to_rgb(vae)
    torch.testing.assert_close(a, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(b, torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="4 channels; this pixel-space model takes 3"):
        vae.encode(torch.zeros(1, 4, 8, 8))


def test_pixel_model_samples_at_scale_one():
    """scale_factor 1: the sampler works on the image in [-1, 1] itself."""
    model = DiffusionModel(ZeroNet(), TrainingSchedule("linear", 1000, 1e-4, 0.02), "eps", 1.0, 3, pixel_space=True)
    z = torch.full((1, 3, 4, 4), 0.5)
    out = sample(model, z, COND, None, seed=0, sampler_name="euler", cfg=1.0,
                 sigmas=torch.tensor([2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out, z + 2.0 * fresh_noise(0, z.shape))  # D(x) = x leaves the start


def test_sampling_at_another_size_than_the_training_one_warns_once(capsys):
    from ldm_nodes.core.pipeline import warn_size

    model = DiffusionModel(None, None, "eps", 1.0, 4, resolution=32, name="mine.safetensors", factor=4)
    warn_size(model, (1, 4, 8, 8))  # 32 x 32: as trained
    assert capsys.readouterr().err == ""
    for _ in range(3):
        warn_size(model, (2, 4, 16, 16))
    err = capsys.readouterr().err
    assert err == ("ldm_nodes: mine.safetensors was trained on 32x32 images; sampling at 64x64 may give poor "
                   "pictures (set width and height to 32)\n")
    warn_size(DiffusionModel(None, None, "eps", 1.0, 4, name="unknown.safetensors", factor=4), (1, 4, 16, 16))
    assert capsys.readouterr().err == ""  # no resolution in its file: nothing to compare
