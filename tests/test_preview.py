"""Step previews look like the image being made (core/preview.py, LDMSample's progress inside ComfyUI).

The measure: LDMSample's preview at the last step against the decoded final image (LDMDecodeLatent),
the same size, mean absolute difference in 0..255, for each built-in model, through the nodes with a
host that says it is ComfyUI and keeps the previews. Their figures: bench/RESULTS.md ("Step previews");
`pytest tests/test_preview.py -s` prints them.
"""
import numpy as np
import pytest
import torch

from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.preview import (DECODE_BUDGET, SD15_LATENT_RGB_FACTORS, decoder_parameters, latent_preview,
                                    preview_method, sd1_latent_to_rgb)
from ldm_nodes.nodes import host
from ldm_nodes.nodes.latent import LDMDecodeLatent, LDMEmptyLatent
from ldm_nodes.nodes.loader import LDMLoadModel
from ldm_nodes.nodes.sample import LDMSample
from ldm_nodes.nodes.schedule import LDMNoiseSchedule
from ldm_nodes.nodes.text import LDMEncodeText

BUILTIN = {"builtin/tiny-shapes.safetensors": 64, "builtin/tiny-shapes-transformer.safetensors": 64,
           "builtin/tiny-shapes-pixel.safetensors": 32}
PROMPT = "a large red circle in the center on a blue background"


class PreviewHost(host.Host):
    """ComfyUI as far as LDMSample can tell: previews are asked for, and kept here."""

    inside_comfyui = True

    def __init__(self):
        self.previews = []

    def progress(self, total):
        previews = self.previews

        class Keep(host.Progress):
            def update(self, done, preview=None):
                previews.append(preview)
        return Keep(total)


@pytest.fixture
def preview_host():
    before = host.current()
    keeper = PreviewHost()
    host.configure(keeper)
    yield keeper
    host.configure(before)


def last_preview_and_image(ckpt_name, size, keeper, steps=10, sampler_name="dpmpp_2m"):
    model, text_encoder, vae = LDMLoadModel().load(ckpt_name, "fp32")  # the same on every CPU
    positive, = LDMEncodeText().encode(text_encoder, PROMPT)
    negative, = LDMEncodeText().encode(text_encoder, "")
    schedule, _ = LDMNoiseSchedule().schedule("model", steps, "karras", False, model)
    latent, = LDMEmptyLatent().make(vae, size, size, 1)
    samples, _ = LDMSample().sample(model, schedule, positive, negative, latent, 3, sampler_name, 5.0, 1.0)
    image, = LDMDecodeLatent().decode(vae, samples)
    assert len(keeper.previews) == steps and all(p is not None for p in keeper.previews)
    return np.asarray(keeper.previews[-1], np.float64), image[0].numpy() * 255


@pytest.mark.parametrize("ckpt_name", list(BUILTIN))
def test_the_last_preview_is_the_final_image(ckpt_name, preview_host):
    size = BUILTIN[ckpt_name]
    preview, image = last_preview_and_image(ckpt_name, size, preview_host)
    assert preview.shape == image.shape == (size, size, 3)  # the image's size, not the latent's or 512
    error = np.abs(preview - image).mean()
    print(f"\n{ckpt_name}: last preview vs final image, mean |difference| {error:.2f}/255")
    assert error < 20  # the bound; decoding x0 gives about 0.5 (JPEG-free, rounding only)


def test_a_fitted_map_is_fitted_on_real_latents(preview_host, monkeypatch):
    """The "fit" method (large autoencoders other than SD1's), forced on the built-in model: fitted on the
    latents of pictures it is about 25/255 off at the last step; fitted on random latents, as before, 89."""
    import ldm_nodes.core.preview as preview

    monkeypatch.setattr(preview, "DECODE_BUDGET", 0)
    image_preview, image = last_preview_and_image("builtin/tiny-shapes.safetensors", 64, preview_host)
    assert image_preview.shape == image.shape
    error = np.abs(image_preview - image).mean()
    print(f"\nfit, builtin/tiny-shapes.safetensors: mean |difference| {error:.2f}/255")
    assert error < 40


def test_the_preview_method_follows_the_decoders_cost():
    """Small decoders decode, SD1's layout uses ComfyUI's SD15 factors, any other large one a fit."""
    tiny = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    assert preview_method(tiny, (1, 4, 16, 16)) == "decode"
    side = int((DECODE_BUDGET / decoder_parameters(tiny)) ** 0.5) + 1  # just over the budget
    assert preview_method(tiny, (1, 4, side, side)) == "fit"
    sd1 = AutoencoderKL(AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2))
    assert sd1.config.f == 8 and preview_method(sd1, (1, 4, 8, 8)) == "sd1"


def test_sd1_previews_are_comfyuis_latent2rgb_at_the_image_size():
    """The oracle: ComfyUI's Latent2RGBPreviewer (latent_preview.py) on the scaled latent, written out here:
    F.linear(x0 scaled, factors^T) -> (v + 1) / 2 clamped; ours is the same at latent resolution, and
    that bilinear-upscaled f times at the image size."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 6) * 2  # unscaled; within the factors' range, so nothing is clamped
    scaled = z * 0.18215
    theirs = torch.nn.functional.linear(scaled[0].movedim(0, -1), torch.tensor(SD15_LATENT_RGB_FACTORS).T)
    theirs = ((theirs + 1) / 2).clamp(0, 1) * 255
    ours = np.asarray(latent_preview(z, sd1_latent_to_rgb(), f=1), np.float64)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=0.5 + 1e-3)  # rounding to uint8 only
    big = latent_preview(z, sd1_latent_to_rgb(), f=8)
    assert big.size == (48, 64)
    upscaled = torch.nn.functional.interpolate(theirs.movedim(-1, 0)[None], scale_factor=8, mode="bilinear")
    np.testing.assert_allclose(np.asarray(big, np.float64), upscaled[0].movedim(0, -1).numpy(), atol=0.5 + 1e-3)
