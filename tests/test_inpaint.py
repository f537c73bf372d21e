"""Masks and inpainting (core/inpaint.py, LDMSample's noise_mask, LDMEncodeImage's mask, the mask stand-ins,
the shipped inpaint workflow), checked against ComfyUI 0.3.64's rules written out as closed forms."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ldm_nodes
from ldm_nodes.headless import runner
from ldm_nodes.core import pipeline
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.denoiser import Denoiser
from ldm_nodes.core.data import COLOR_RGB, Scene, render
from ldm_nodes.core.errors import InputError
from ldm_nodes.core.inpaint import MaskedDenoiser, composite, grow_mask, latent_mask, masked_pixels
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, run_sigmas, sample
from ldm_nodes.tools import scene_analysis
from ldm_nodes.tools.randomise import randomise
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.nodes.latent import LDMEncodeImage
from ldm_nodes.nodes.loader import Loaded
from ldm_nodes.headless.session import Session, using
from ldm_nodes.headless.standins import ImageCompositeMasked, ImageToMask, InvertMask, LoadImage, SetLatentNoiseMask

PACK = Path(ldm_nodes.__file__).resolve().parent

SCALE = 0.5
SHAPE = (2, 4, 8, 8)  # latents of 32 x 32 images at f = 4
COND = Conditioning(torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(1)), "")


def tiny_model():
    torch.manual_seed(0)
    unet = randomise(UNetModel(UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 8, num_heads=2)))
    return DiffusionModel(unet, TrainingSchedule(), "eps", SCALE, 4)


MODEL = tiny_model()


def latent(seed=9, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def box_mask(size=32, rows=slice(8, 24), cols=slice(4, 20)):
    """1 on a box aligned to the f = 4 latent grid (latent rows 2..5, columns 1..4), 0 elsewhere."""
    mask = torch.zeros(1, size, size)
    mask[:, rows, cols] = 1
    return mask


def run(z, noise_mask=None, sigmas=None, seed=4, sampler_name="euler_ancestral", model=MODEL, **options):
    """sample(); with a mask, also checks the per-step blend at every step: the sampler's denoised
    estimate is the original (scaled) latent outside the mask. The final keep-outside copy makes the
    result exact there whatever the steps did, so only this sees a step that skipped the blend."""
    sigmas = ScheduleSpec("model", 5, "karras").sigmas(model.schedule) if sigmas is None else sigmas
    steps = []
    out = sample(model, z, COND, COND, seed=seed, sigmas=sigmas, sampler_name=sampler_name, cfg=2.0,
                 noise_mask=noise_mask, callback=lambda info: steps.append(info["denoised"].clone()), **options)
    if noise_mask is not None and len(sigmas) > 1:
        outside = latent_mask(noise_mask, z.shape) == 0
        assert len(steps) == len(sigmas) - 1
        for i, denoised in enumerate(steps):
            assert torch.equal(denoised[outside], (z * model.scale_factor)[outside]), f"step {i}: no per-step blend"
    return out


# ---------------------------------------------------------------------------------------------
# The blend (KSamplerX0Inpaint) and the result

def test_outside_the_mask_the_latent_is_kept_exactly_and_inside_it_changes():
    z, mask = latent(), box_mask()
    out = run(z, mask)
    inside = latent_mask(mask, SHAPE).bool()
    assert torch.equal(out[~inside], z[~inside])
    assert (out[inside] - z[inside]).abs().mean() > 0.1


@pytest.mark.parametrize("how", ["denoise 0.5", "linked sigmas"])
def test_the_kept_region_holds_with_denoise_below_one_and_with_linked_sigmas(how):
    z, mask = latent(), box_mask()
    spec = ScheduleSpec("model", 6, "karras")
    sigmas = (run_sigmas(MODEL, spec, 0.5) if how == "denoise 0.5"
              else run_sigmas(MODEL, spec, 1.0, torch.tensor([3.0, 1.5, 0.4, 0.0])))
    out = run(z, mask, sigmas, sampler_name="dpmpp_2m")
    inside = latent_mask(mask, SHAPE).bool()
    assert torch.equal(out[~inside], z[~inside]) and not torch.equal(out[inside], z[inside])


def test_every_denoiser_call_sees_the_original_latent_noised_with_the_initial_noise(monkeypatch):
    """x_in = m x + (1 - m)(z + sigma n) with n the seed's first draw (no extra draw), and the denoised
    estimate is z outside the mask."""
    seen = []

    class Recording(MaskedDenoiser):
        def __init__(self, denoiser, z, noise, mask):
            def inner(x, sigma):
                seen.append((x.clone(), float(sigma)))
                return denoiser(x, sigma)
            super().__init__(inner, z, noise, mask)

        def __call__(self, x, sigma):
            out = super().__call__(x, sigma)
            assert torch.equal(out[~self.mask.bool()], self.z[~self.mask.bool()])
            return out

    monkeypatch.setattr(pipeline, "MaskedDenoiser", Recording)
    z, mask = latent(), box_mask()
    run(z, mask, seed=11, sampler_name="heun")  # two calls per step
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(11))
    outside = ~latent_mask(mask, SHAPE).bool()
    assert len(seen) == 9
    for x_in, sigma in seen:
        torch.testing.assert_close(x_in[outside], (z * SCALE + sigma * noise)[outside], rtol=0, atol=1e-6)


def test_the_repainted_region_is_the_euler_solution_of_the_blended_denoiser_written_out():
    """The oracle, independent of MaskedDenoiser: Euler steps x <- x + (s' - s)(x - D')/s on
    D'(x) = m D(m x + (1 - m)(z + s n)) + (1 - m) z, D the guided denoiser, n the seed's first draw.
    Inside the mask the result depends on what the steps saw outside it (the UNet's convolutions
    reach across the edge), so a sampler that denoised the unblended x would differ there."""
    z, mask = latent(), box_mask()
    sigmas = ScheduleSpec("model", 5, "karras").sigmas(MODEL.schedule)
    out = run(z, mask, sigmas, seed=7, sampler_name="euler")
    m = latent_mask(mask, SHAPE)
    zs = z * SCALE
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    denoiser = Denoiser(MODEL.network, MODEL.schedule, "eps", COND.context, COND.context, 2.0)
    x = zs + noise * float(sigmas[0])
    with torch.inference_mode():
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            kept = zs + s * noise
            d = m * denoiser(m * x + (1 - m) * kept, s) + (1 - m) * zs
            x = x + (s_next - s) * (x - d) / s
    torch.testing.assert_close(out, x / SCALE * m + z * (1 - m), rtol=0, atol=1e-5)
    # the same steps on D(x) alone move the region inside the mask: the comparison above can tell
    x = zs + noise * float(sigmas[0])
    with torch.inference_mode():
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + (s_next - s) * (x - denoiser(x, s)) / s
    unblended = x / SCALE
    inside = m.bool()
    assert (unblended[inside] - out[inside]).abs().max() > 1e-2


def test_an_all_zero_mask_returns_the_latent_unchanged():
    z = latent()
    assert torch.equal(run(z, torch.zeros(1, 32, 32)), z)


@pytest.mark.parametrize("start", ["empty", "image, denoise 0.6"])
def test_an_all_one_mask_gives_exactly_the_unmasked_result(start):
    z = torch.zeros(SHAPE) if start == "empty" else latent()
    sigmas = run_sigmas(MODEL, ScheduleSpec("model", 5, "karras"), 1.0 if start == "empty" else 0.6)
    assert torch.equal(run(z, torch.ones(1, 32, 32), sigmas), run(z, None, sigmas))  # stochastic sampler too


def test_a_batch_of_latents_with_a_single_mask():
    z, mask = latent(shape=(3, 4, 8, 8)), box_mask()
    out = run(z, mask)
    inside = latent_mask(mask, z.shape).bool()
    assert inside.shape == z.shape and torch.equal(out[~inside], z[~inside])
    for i in range(3):
        assert not torch.equal(out[i][inside[i]], z[i][inside[i]])


# ---------------------------------------------------------------------------------------------
# The mask: resize, clamp, dimensions (comfy.utils.reshape_mask)

def test_a_mask_of_another_size_is_resized_bilinearly_to_the_latent():
    torch.testing.assert_close(latent_mask(torch.full((1, 50, 70), 0.3), SHAPE), torch.full(SHAPE, 0.3))
    expected = torch.zeros(SHAPE)
    expected[:, :, 2:6, 1:5] = 1
    assert torch.equal(latent_mask(box_mask(), SHAPE), expected)  # block-aligned: exact
    # upsampled: a 2 x 2 mask [[0, 1], [0, 1]] to 8 x 8 is 0 then a bilinear ramp then 1 along a row
    row = latent_mask(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), SHAPE)[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1]))


def test_mask_values_outside_zero_one_are_clamped():
    z, mask = latent(), box_mask()
    assert torch.equal(run(z, mask * 5 - 2), run(z, mask))  # -2 -> 0, 3 -> 1


@pytest.mark.parametrize("shape", [(64,), (1, 2, 32, 32), (1, 1, 1, 32, 32)])
def test_a_mask_with_the_wrong_dimensions_is_refused_naming_it(shape):
    with pytest.raises(InputError, match="^noise_mask: expected a MASK"):
        run(latent(), torch.ones(shape))
    autoencoder = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    with pytest.raises(InputError, match="^mask: expected a MASK"):
        LDMEncodeImage().encode(Loaded(autoencoder, autoencoder, "tiny"), torch.zeros(1, 32, 32, 3), torch.ones(shape))


# ---------------------------------------------------------------------------------------------
# LDMEncodeImage's mask (VAEEncodeForInpaint's grow_mask_by) and the inpainting model's masked image

def test_grow_mask_by_is_a_box_dilation_as_vae_encode_for_inpaint():
    point = torch.zeros(1, 9, 9)
    point[0, 4, 4] = 1
    grown = {k: grow_mask(point, (9, 9), k)[0, 0] for k in (0, 2, 3)}
    assert torch.equal(grown[0], point[0])
    assert grown[3].nonzero().tolist() == [[r, c] for r in (3, 4, 5) for c in (3, 4, 5)]
    # an even box: conv2d padding ceil(1 / 2) = 1 then the first 9 rows: rows and columns 4 and 5
    assert grown[2].nonzero().tolist() == [[r, c] for r in (4, 5) for c in (4, 5)]
    # ComfyUI's default 6 and an odd 7: padding ceil((k - 1) / 2) = 3, so the box is rows c - 2..c + 3 and
    # c - 3..c + 3 (the first 9 of the padded output)
    for k, rows in ((6, range(2, 8)), (7, range(1, 8))):
        assert grow_mask(point, (9, 9), k)[0, 0].nonzero().tolist() == [[r, c] for r in rows for c in rows]
    # a mask of another size is first resized to the image, then rounded
    assert torch.equal(grow_mask(torch.full((1, 3, 3), 0.6), (9, 9), 0), torch.ones(1, 1, 9, 9))


def test_masked_pixels_are_gray_where_the_rounded_mask_is_one():
    image = torch.rand(2, 4, 4, 3)
    mask = torch.tensor([[0.2, 0.7, 0.0, 1.0]]).repeat(4, 1)[None]
    out = masked_pixels(image, mask)
    assert torch.equal(out[:, :, [1, 3]], torch.full((2, 4, 2, 3), 0.5))
    torch.testing.assert_close(out[:, :, [0, 2]], image[:, :, [0, 2]])


# ---------------------------------------------------------------------------------------------
# The stand-ins for ComfyUI's mask nodes (nodes.py, comfy_extras/nodes_mask.py at 0.3.64)

def test_set_latent_noise_mask_reshapes_to_batch_one_height_width():
    samples = {"samples": latent(), "batch_index": [0, 1]}
    (out,) = SetLatentNoiseMask().set_mask(samples, torch.ones(2, 32, 32))
    assert out["noise_mask"].shape == (2, 1, 32, 32) and out["batch_index"] == [0, 1] and "noise_mask" not in samples


def test_image_to_mask_and_invert_mask():
    image = torch.rand(1, 4, 5, 3)
    (mask,) = ImageToMask().image_to_mask(image, "green")
    assert torch.equal(mask, image[..., 1]) and torch.equal(InvertMask().invert(mask)[0], 1.0 - mask)
    with pytest.raises(InputError, match="^channel: .*3 channels"):
        ImageToMask().image_to_mask(image, "alpha")


def expected_rgb(destination):
    """destination with a 4 x 4 square of ones at x 2, y 3."""
    out = destination.clone()
    out[:, 3:7, 2:6] = 1
    return out


def test_image_composite_masked_pastes_the_source_through_the_mask():
    destination, source = torch.zeros(1, 8, 8, 3), torch.ones(1, 4, 4, 3)
    (out,) = ImageCompositeMasked().composite(destination, source, 2, 3, False)
    expected = torch.zeros(1, 8, 8, 3)
    expected[:, 3:7, 2:6] = 1
    assert torch.equal(out, expected) and not destination.any()
    (cut,) = ImageCompositeMasked().composite(destination, source, 6, 0, False)  # 2 columns visible
    assert cut.sum() == 4 * 2 * 3 and torch.equal(cut[:, 0:4, 6:8], torch.ones(1, 4, 2, 3))
    (low,) = ImageCompositeMasked().composite(destination, source, 0, 6, False)  # 2 rows visible
    assert low.sum() == 2 * 4 * 3 and torch.equal(low[:, 6:8, 0:4], torch.ones(1, 2, 4, 3))
    (soft,) = ImageCompositeMasked().composite(destination, source, 0, 0, False, torch.full((1, 4, 4), 0.25))
    assert torch.equal(soft[:, :4, :4], torch.full((1, 4, 4, 3), 0.25)) and soft[:, 4:].sum() == 0
    (resized,) = ImageCompositeMasked().composite(destination, source, 0, 0, True)
    assert torch.equal(resized, torch.ones(1, 8, 8, 3))
    (wide,) = ImageCompositeMasked().composite(destination, torch.ones(1, 2, 5, 3), 1, 4, False)  # not square
    expected = torch.zeros(1, 8, 8, 3)
    expected[:, 4:6, 1:6] = 1
    assert torch.equal(wide, expected)
    rgba = torch.cat([torch.ones(1, 4, 4, 3), torch.zeros(1, 4, 4, 1)], dim=-1)  # an RGBA source: its alpha dropped
    assert torch.equal(ImageCompositeMasked().composite(destination, rgba, 2, 3, False)[0], expected_rgb(destination))
    tall = torch.zeros(1, 8, 4, 3)  # x beyond a destination narrower than it is tall: nothing pasted
    assert torch.equal(ImageCompositeMasked().composite(tall, source, 6, 0, False)[0], tall)
    with pytest.raises(InputError, match="^source: has 3 channels and the destination 4"):  # ComfyUI fails here
        ImageCompositeMasked().composite(torch.zeros(1, 8, 8, 4), source, 2, 3, False)


def test_composite_keeps_the_destination_exactly_outside_the_mask():
    g = torch.Generator().manual_seed(2)
    destination, source = torch.rand(2, 16, 16, 3, generator=g), torch.rand(2, 16, 16, 3, generator=g)
    mask = box_mask(16, slice(2, 9), slice(5, 12))
    out = composite(destination, source, 0, 0, mask)
    keep = ~mask[0].bool()
    assert torch.equal(out[:, keep], destination[:, keep]) and torch.equal(out[:, ~keep], source[:, ~keep])


# ---------------------------------------------------------------------------------------------
# The shipped example: input/inpaint.png through workflows/api/inpaint.json with the built-in model

SCENE = Scene("large", "red", "circle", "on the left", "blue", center=(17.0, 32.0), span=30.0, angle=0.0,
              rgb=COLOR_RGB["red"], background_rgb=COLOR_RGB["blue"])
MASK_BOX = (slice(16, 48), slice(1, 33))  # rows, columns: the circle's bounding box (x 2..32, y 17..47) + 1 px
CORNER_SQUARE = (54, 4, 59, 9)  # a detail outside the mask: a small white square, top right


def picture():
    """The example: core/data.py's rendering of SCENE, a corner square, transparent (mask 1) on MASK_BOX."""
    image = render(SCENE)
    ImageDraw.Draw(image).rectangle(CORNER_SQUARE, fill=COLOR_RGB["white"])
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[MASK_BOX] = 0
    image.putalpha(Image.fromarray(alpha))
    return image


def test_the_shipped_picture_is_the_scene_with_its_mask_as_alpha():
    with Image.open(PACK / "input" / "inpaint.png") as shipped:
        assert shipped.mode == "RGBA" and np.array_equal(np.asarray(shipped), np.asarray(picture()))
    with using(Session(input_dir=PACK / "input")):
        _, mask = LoadImage().load_image("inpaint.png")
    expected = torch.zeros(1, 64, 64)
    expected[:, MASK_BOX[0], MASK_BOX[1]] = 1
    assert torch.equal(mask, expected)


@pytest.fixture(scope="module")
def inpainted(tmp_path_factory):
    """The API workflow with the built-in model, plus a PreviewImage of the decoded image before the paste."""
    prompt = runner.load_workflow(PACK / "workflows" / "api" / "inpaint.json")
    prompt["99"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    out = tmp_path_factory.mktemp("inpaint")
    runner.run(prompt, out_dir=out, input_dir=PACK / "input")
    with Image.open(out / "ldm_inpaint_00001_.png") as final:
        with Image.open(out / "temp" / "ComfyUI_temp_00001_.png") as raw:
            return np.asarray(final), np.asarray(raw)


def test_the_workflow_repaints_the_mask_from_the_prompt_and_keeps_the_rest_exactly(inpainted):
    final, _ = inpainted
    original = np.asarray(picture())
    keep = original[..., 3] == 255
    assert np.array_equal(final[keep], original[..., :3][keep])
    words = scene_analysis.analyse(final)
    assert (words["color"], words["shape"], words["position"], words["background"]) == \
        ("yellow", "triangle", "on the left", "blue")


def test_without_the_paste_the_detail_outside_the_mask_survives_decoding(inpainted):
    _, raw = inpainted
    left, top, right, bottom = CORNER_SQUARE
    square = raw[top + 1:bottom, left + 1:right].reshape(-1, 3).astype(float)
    background = np.asarray(COLOR_RGB["blue"], dtype=float)
    assert np.linalg.norm(square - background, axis=1).min() > 150  # still a light square on blue
    assert scene_analysis.analyse(raw)["shape"] == "triangle"
