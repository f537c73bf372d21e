"""The image-level bound: pipeline.likelihood, the LDMLikelihood node, its plot and `python -m ldm_nodes nll`.

The oracle is core/likelihood.variational_bound itself (tested against closed forms in test_likelihood.py):
these tests check that images reach it as the right x0 (the 8-bit grid for pixel models, the scaled
posterior mean for latent models), with the right units, condition and noise, and that bad inputs are named.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_nodes.cli import main
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL, IdentityAutoencoder
from ldm_nodes.core.likelihood import denoiser_likelihood, variational_bound
from ldm_nodes.core.pipeline import DiffusionModel, likelihood
from ldm_nodes.core.plot import plot_bound
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.nodes.likelihood import LDMLikelihood
from ldm_nodes.nodes.loader import Loaded, LoadedModel

SCHEDULE = TrainingSchedule("linear", 1000, 1e-4, 0.02)
WIDTH = 32


def network(channels, seed=0):
    torch.manual_seed(seed)
    net = UNetModel(UNetConfig(channels, channels, 32, (1, 2), 1, (1,), 1, WIDTH, num_head_channels=16)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.03)
    return net


def pixel_model(resolution=None):
    empty = torch.randn(1, 77, WIDTH, generator=torch.Generator().manual_seed(1))
    return DiffusionModel(network(3), SCHEDULE, "eps", 1.0, 3, True, resolution, empty)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (2, 8, 8, 3), generator=g).float() / 255)


def test_pixel_model_scores_the_8_bit_image_in_bits_per_dim(images):
    model = pixel_model()
    bound = likelihood(model, IdentityAutoencoder(), images + 1e-4, steps=20, seed=3)  # off-grid input is rounded
    x0 = (images * 255).round() / 127.5 - 1
    expected = variational_bound(model.network, x0.movedim(-1, 1), SCHEDULE, "eps", model.empty_context,
                                 timesteps=20, generator=torch.Generator().manual_seed(3))
    assert bound.unit == "bits/dim" and bound.dims == 3 * 8 * 8
    torch.testing.assert_close(bound.total, expected.total, rtol=1e-5, atol=0)
    torch.testing.assert_close(bound.terms, expected.terms, rtol=1e-5, atol=0)


def test_latent_model_scores_the_scaled_posterior_mean_in_nats_per_dim(images):
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.7)).eval()
    model = DiffusionModel(network(4), SCHEDULE, "eps", 0.7, 4, False, None, torch.randn(1, 77, WIDTH))
    bound = likelihood(model, vae, images, steps=10, seed=1)
    with torch.no_grad():
        z0 = vae.encode(images.movedim(-1, 1) * 2 - 1).mode() * 0.7
    expected = variational_bound(model.network, z0, SCHEDULE, "eps", model.empty_context, discrete=False,
                                 timesteps=10, generator=torch.Generator().manual_seed(1))
    assert bound.unit == "nats/dim (latent)" and bound.dims == 4 * 4 * 4
    torch.testing.assert_close(bound.total, expected.total, rtol=1e-5, atol=1e-7)


def test_the_condition_reaches_the_network(images):
    model = pixel_model()
    vae = IdentityAutoencoder()
    default = likelihood(model, vae, images, steps=8)
    assert torch.equal(likelihood(model, vae, images, model.empty_context, steps=8).total, default.total)
    other = likelihood(model, vae, images, torch.randn(1, 77, WIDTH), steps=8).total
    assert not torch.equal(other, default.total)  # same draws: any change comes from the context


def test_all_timesteps_by_default_and_the_seed_sets_the_draws(images):
    model = pixel_model()
    full = likelihood(model, IdentityAutoencoder(), images[:1])
    assert full.standard_error is None and full.terms.shape == (1, 999)
    a, b = (likelihood(model, IdentityAutoencoder(), images, steps=5, seed=s).total for s in (0, 1))
    assert not torch.equal(a, b)


def test_half_precision_network_stays_close(images):
    model = pixel_model()
    full = likelihood(model, IdentityAutoencoder(), images, steps=10).total
    model.network = model.network.to(torch.bfloat16)
    half = likelihood(model, IdentityAutoencoder(), images, steps=10).total
    torch.testing.assert_close(half, full, rtol=0.05, atol=0)


@pytest.mark.parametrize("shape, steps, resolution, message", [
    ((1, 8, 8, 4), 0, None, r"image: expected \[batch, height, width, 3\]"),
    ((1, 3, 8, 8), 0, None, r"image: expected \[batch, height, width, 3\]"),
    ((1, 16, 16, 3), 0, 8, "image: 16x16, but this model was trained on 8x8 images"),
    ((1, 8, 8, 3), 1, None, "steps: 0 .all 1000 timesteps. or a strided estimate of 2..999, got 1"),
    ((1, 8, 8, 3), 1000, None, "steps: .*got 1000"),
    ((1, 8, 8, 3), -3, None, "steps: .*got -3"),
])
def test_bad_inputs_name_the_input(shape, steps, resolution, message):
    with pytest.raises(ValueError, match=message):
        likelihood(pixel_model(resolution), IdentityAutoencoder(), torch.rand(shape), steps=steps)


def test_sizes_off_the_autoencoders_grid_are_refused():
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    model = DiffusionModel(network(4), SCHEDULE, "eps", 1.0, 4, False, None, torch.zeros(1, 77, WIDTH))
    with pytest.raises(ValueError, match="image: 9x9 is not a multiple of 2"):
        likelihood(model, vae, torch.rand(1, 9, 9, 3), steps=4)


def test_a_model_without_a_schedule_is_refused(images):
    model = pixel_model()
    model.schedule = None
    with pytest.raises(ValueError, match="model: has no known training schedule"):
        likelihood(model, IdentityAutoencoder(), images, steps=4)


def test_plot_shows_the_terms_with_their_unit(images):
    bound = likelihood(pixel_model(), IdentityAutoencoder(), images, steps=30)
    picture = np.asarray(plot_bound(bound))
    assert picture.shape == (400, 640, 3)
    blue = (picture[..., 2] > 150) & (picture[..., 0] < 100)
    red = (picture[..., 0] > 150) & (picture[..., 2] < 100)
    assert blue.sum() > 30 and red.sum() > 10  # the terms and L_0 are drawn


def test_node_returns_the_mean_bound_and_a_plot(images):
    model = pixel_model()
    vae = IdentityAutoencoder()
    calls = []
    loaded = LoadedModel(model, model.network, "m", Loaded(vae, vae, "m"))
    from ldm_nodes.headless import runner
    original = runner.progress
    runner.progress = lambda done, total: calls.append((done, total))
    try:
        nll, plot = LDMLikelihood().score(loaded, Loaded(vae, vae, "m"), images, "beta", 8)
    finally:
        runner.progress = original
    expected = likelihood(model, vae, images, None, "beta", 8)
    assert nll == pytest.approx(float(expected.total.mean()))
    assert plot.shape == (1, 400, 640, 3) and plot.dtype == torch.float32 and 0 <= plot.min() and plot.max() <= 1
    assert calls and calls[-1][0] == calls[-1][1]


# --- the command ----------------------------------------------------------------------------

@pytest.fixture
def pixel_file(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    text = CLIPTextModel(CLIPTextConfig(width=WIDTH, layers=1, heads=2, mlp_width=64))
    ck.save_checkpoint(folder / "pixel.safetensors", network(3), IdentityAutoencoder(), text, SCHEDULE, "eps",
                       dtype=torch.float32, extra={"training": {"resolution": 8}})
    return folder


def write(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return str(path)


def test_nll_command_prints_one_line_per_image_and_the_unit_once(pixel_file, tmp_path, capsys):
    rng = np.random.default_rng(0)
    noise = write(tmp_path / "noise.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    flat = write(tmp_path / "flat.png", np.full((8, 8, 3), 128, np.uint8))
    args = [noise, flat, "--model", "pixel.safetensors", "--models-dir", str(pixel_file), "--steps", "16"]
    assert main(["nll", *args]) == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.strip().splitlines()]  # path, bound, its standard error
    assert [p for p, _, _ in lines] == [noise, flat]
    assert err.count("bits/dim") == 1 and "bits/dim" not in out and "standard error" in err
    assert main(["nll", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unit"] == "bits/dim" and [r["image"] for r in report["images"]] == [noise, flat]
    assert [round(r["nll"], 4) for r in report["images"]] == [float(v) for _, v, _ in lines]
    assert [round(r["standard_error"], 4) for r in report["images"]] == [float(e) for _, _, e in lines]
    assert main(["nll", noise, "--model", "pixel.safetensors", "--models-dir", str(pixel_file)]) == 0
    assert len(capsys.readouterr().out.strip().split("\t")) == 2  # all timesteps: no standard error


def test_nll_command_shows_progress_per_network_call_unless_quiet(pixel_file, tmp_path, capsys):
    flat = write(tmp_path / "flat.png", np.full((8, 8, 3), 128, np.uint8))
    args = [flat, "--model", "pixel.safetensors", "--models-dir", str(pixel_file), "--steps", "16"]
    assert main(["nll", *args]) == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if line.startswith(f"[nll {flat}]")]
    assert progress and progress[-1].endswith("1/1 network calls") and "\r" not in err  # not a terminal: lines
    assert main(["nll", *args, "--quiet"]) == 0
    assert "network calls" not in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: write(p, np.zeros((8, 8, 4), np.uint8), "RGBA"), "mode RGBA"),
    (lambda p: write(p, np.zeros((16, 16, 3), np.uint8)), "16x16, but this model was trained on 8x8"),
    (lambda p: (p.write_bytes(b"not an image"), str(p))[1], "cannot read the image"),
])
def test_nll_command_names_the_bad_image(pixel_file, tmp_path, capsys, make, message):
    path = make(tmp_path / "bad.png")
    assert main(["nll", path, "--model", "pixel.safetensors", "--models-dir", str(pixel_file), "--steps", "4"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "bad.png" in err


def test_nll_command_checks_the_images_before_loading_the_model(tmp_path, capsys):
    assert main(["nll", str(tmp_path / "typo.png"), "--model", "nope.safetensors", "--models-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "typo.png: no such file" in err and "nope" not in err


def test_nll_command_names_a_missing_model(tmp_path, capsys):
    path = write(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    assert main(["nll", path, "--model", "nope.safetensors", "--models-dir", str(tmp_path)]) == 1
    assert "no model 'nope.safetensors'" in capsys.readouterr().err


def test_nodes_take_a_pixel_space_file_like_any_other(pixel_file):
    from ldm_nodes.nodes import model_paths
    from ldm_nodes.nodes import LDMDecodeLatent, LDMEmptyLatent, LDMEncodeImage, LDMLoadModel
    saved = list(model_paths._model_dirs)
    model_paths.set_model_dirs([pixel_file])
    try:
        model, text, vae = LDMLoadModel().load("pixel.safetensors", "auto")
    finally:
        model_paths.set_model_dirs(saved)
    assert isinstance(vae.core, IdentityAutoencoder) and model.core.pixel_space and model.core.resolution == 8
    (latent,) = LDMEmptyLatent().make(vae, 8, 8, 2)
    assert latent["samples"].shape == (2, 3, 8, 8)
    image = torch.randint(0, 256, (1, 8, 8, 3)).float() / 255
    (encoded,) = LDMEncodeImage().encode(vae, image)
    (decoded,) = LDMDecodeLatent().decode(vae, encoded)
    torch.testing.assert_close(decoded, image)
    nll, _ = LDMLikelihood().score(model, vae, image, "beta_tilde", 4)
    assert nll > 0


def k_denoiser(network, context, sigmas, prediction):
    """A k-diffusion denoiser D(x, sigma) -> x0 made as ComfyUI makes its MODEL's (model_sampling.EPS and
    V_PREDICTION: input x / sqrt(sigma^2 + 1), timestep the nearest log sigma of a float32 table), written
    here independently of core/likelihood.x0_network."""
    log_sigmas = sigmas.log()

    def denoise(x, sigma):
        t = (sigma.log()[None] - log_sigmas[:, None]).abs().argmin(0)
        scale = (sigma ** 2 + 1).sqrt().reshape(-1, 1, 1, 1)
        out = network(x / scale, t.float(), context.expand(len(x), -1, -1))
        s = sigma.reshape(-1, 1, 1, 1)
        if prediction == "eps":
            return x - out * s
        return x / scale ** 2 - out * s / scale
    return denoise


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_k_diffusion_denoiser_is_scored_as_its_network(prediction):
    """denoiser_likelihood (LDMComfyLikelihood's core) on a host-style denoiser equals variational_bound on
    the network inside it, with its prediction type, for the same seed; an eps reading of a v network does not."""
    net = network(4)
    context = torch.randn(1, 77, WIDTH, generator=torch.Generator().manual_seed(2))
    sigmas = SCHEDULE.sigmas.float()  # what a host keeps
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    got = denoiser_likelihood(k_denoiser(net, context, sigmas, prediction), z0, sigmas, steps=12, seed=4)
    want = variational_bound(net, z0, SCHEDULE, prediction, context, discrete=False, timesteps=12,
                             generator=torch.Generator().manual_seed(4))
    assert got.unit == "nats/dim (latent)" and torch.isfinite(got.total).all()
    torch.testing.assert_close(got.total, want.total, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.terms, want.terms, rtol=1e-4, atol=1e-6)
    other = variational_bound(net, z0, SCHEDULE, "v" if prediction == "eps" else "eps", context, discrete=False,
                              timesteps=12, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(got.total, other.total, rtol=1e-2)


def test_a_k_diffusion_denoiser_bound_refuses_bad_steps():
    sigmas = SCHEDULE.sigmas.float()
    with pytest.raises(ValueError, match="steps: 0 .all 1000 timesteps. or a strided estimate of 2..999, got 1"):
        denoiser_likelihood(lambda x, s: x, torch.zeros(1, 4, 4, 4), sigmas, steps=1)
