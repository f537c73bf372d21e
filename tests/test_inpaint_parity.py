"""SD1.x inpainting models (a UNet with 9 input channels) against diffusers' StableDiffusionInpaintPipeline.

A single-file checkpoint of tiny random weights without metadata (config read from the shapes) is loaded
by our loader; diffusers gets the same weights through its own converters. Both sides sample the same
start noise with DDIM (eta 0, leading spacing, SD's schedule) and guidance; the inpainting model's extra
inputs are built on each side from the same image and mask: our core/inpaint.py and pipeline against
diffusers' mask processor and its own VAE encoding of the masked image.

What is not compared: ComfyUI's noise-mask blend (core/inpaint.MaskedDenoiser), which LDMSample adds on
top and diffusers' pipeline does not do for 9-channel UNets (it blends only for 4-channel ones).
"""
import dataclasses
import importlib.util
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_nodes.core.checkpoint import load_checkpoint  # noqa: E402
from ldm_nodes.core.denoiser import Denoiser  # noqa: E402
from ldm_nodes.core.errors import InputError  # noqa: E402
from ldm_nodes.core.inpaint import latent_mask, masked_pixels  # noqa: E402
from ldm_nodes.core.pipeline import (Conditioning, DiffusionModel, encode_image, inpainting_network,  # noqa: E402
                                     likelihood, sample)
from ldm_nodes.tools.randomise import randomise  # noqa: E402
from ldm_nodes.core.samplers import SAMPLERS  # noqa: E402
from ldm_nodes.core.schedule import sampling_schedule  # noqa: E402
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from ldm_nodes.core.unet import UNetConfig, UNetModel  # noqa: E402

_spec = importlib.util.spec_from_file_location("test_unet", Path(__file__).resolve().parent / "test_unet.py")
_test_unet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_test_unet)
diffusers_unet = _test_unet.diffusers_unet  # diffusers' own config creator and converter

# Channels in multiples of 64: without metadata the heads default to width 64 (SD_REFERENCE 4.2).
UNET = UNetConfig(in_channels=9, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), transformer_depth=1, context_dim=64, num_head_channels=64)
# the same network for diffusers' config creator, which reads heads of width 64 only with linear projections
UNET_TWO_HEADS = dataclasses.replace(UNET, num_heads=2, num_head_channels=None)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TEXT = CLIPTextConfig(vocab_size=49408, width=64, layers=1, heads=1, mlp_width=128)
SIZE, F = 32, 2  # image side, the autoencoder's downsampling
STEPS, CFG = 10, 3.0
# The UNet alone matches to 1e-4 (test_unet.py); ten guided steps through it stay within the same 1e-4
# (observed: 4.8e-5 on a final latent of std 10; swapping the mask and masked-image channels gives 8.3).
ATOL = 1e-4


@pytest.fixture(scope="module")
def inpainting_file(tmp_path_factory):
    torch.manual_seed(0)
    parts = {"model.diffusion_model.": randomise(UNetModel(UNET)), "first_stage_model.": randomise(AutoencoderKL(VAE)),
             "cond_stage_model.transformer.": CLIPTextModel(TEXT)}
    tensors = {prefix + k: v.contiguous() for prefix, module in parts.items() for k, v in module.state_dict().items()}
    path = tmp_path_factory.mktemp("inpaint") / "sd-inpainting-tiny.safetensors"
    save_file(tensors, str(path))  # no metadata: every config is read from the shapes
    return path, tensors


def diffusers_vae(tensors):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(VAE.ch_mult)
    config = dict(in_channels=3, out_channels=3, latent_channels=VAE.z_channels,
                  block_out_channels=[VAE.ch * m for m in VAE.ch_mult], layers_per_block=VAE.num_res_blocks,
                  down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                  norm_num_groups=32, scaling_factor=0.18215)
    vae = DiffusersAutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(tensors, config), strict=True)
    return vae


def picture_and_mask():
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(SIZE, SIZE), mode="bilinear")
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 8:24, 4:20] = 1  # aligned to the latent grid: diffusers' nearest and ComfyUI's bilinear agree there
    return image.movedim(1, -1), mask


def test_inpainting_checkpoint_loads_with_its_config_from_the_shapes(inpainting_file):
    checkpoint = load_checkpoint(inpainting_file[0])
    assert checkpoint.denoiser.config == UNET
    model = DiffusionModel.from_checkpoint(checkpoint)
    assert (model.in_channels, model.latent_channels) == (9, 4)


def test_inpainting_model_matches_diffusers(inpainting_file):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    path, tensors = inpainting_file
    checkpoint = load_checkpoint(path)
    model = DiffusionModel.from_checkpoint(checkpoint)
    image, mask = picture_and_mask()
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    shape = (1, 4, SIZE // F, SIZE // F)

    # ours: the extra inputs from the mask and the masked image, then DDIM with guidance
    masked_latent = encode_image(checkpoint.vae, masked_pixels(image, mask))
    network = inpainting_network(model, latent_mask(mask, shape), torch.zeros(shape), masked_latent)
    training = model.schedule
    sigmas = sampling_schedule(training, STEPS, "leading", 1).sigmas
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(network, training, "eps", cond, uncond, CFG)
    with torch.no_grad():
        ours = SAMPLERS["ddim"](denoiser, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, eta=0.0)

    # diffusers: its own masked image (pixels where mask < 0.5), its VAE, its pipeline
    vae = diffusers_vae(tensors)
    pixels = image.movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        reference_masked = vae.encode(pixels * (mask[:, None] < 0.5)).latent_dist.mode() * vae.config.scaling_factor
    assert (masked_latent * model.scale_factor - reference_masked).abs().max() <= 1e-4
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None,
                                          unet=diffusers_unet(UNET_TWO_HEADS, tensors), scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image.movedim(-1, 1),
                         mask_image=mask[:, None],
                         masked_image_latents=reference_masked, latents=noise.clone(), height=SIZE, width=SIZE,
                         num_inference_steps=STEPS, guidance_scale=CFG, strength=1.0, output_type="latent").images
    assert reference.std() > 0.1
    difference = float((ours - reference).abs().max())
    print(f"inpainting parity: max abs difference {difference:.3g} (latent std {float(reference.std()):.3g})")
    assert difference <= ATOL, f"max abs difference {difference:.3g}"


def test_inpainting_model_without_a_mask_is_refused_naming_the_model_and_the_mask(inpainting_file):
    model = DiffusionModel.from_checkpoint(load_checkpoint(inpainting_file[0]))
    context = Conditioning(torch.zeros(1, 77, 64), "")
    sigmas = sampling_schedule(model.schedule, 2, "leading", 1).sigmas
    with pytest.raises(InputError, match=r"sd-inpainting-tiny\.safetensors.*inpainting model.*mask"):
        sample(model, torch.zeros(1, 4, 16, 16), context, context, seed=0, sigmas=sigmas, sampler_name="euler", cfg=1.0)


def test_inpainting_model_has_no_image_likelihood(inpainting_file):
    checkpoint = load_checkpoint(inpainting_file[0])
    with pytest.raises(InputError, match="^model: sd-inpainting-tiny.safetensors is an inpainting model"):
        likelihood(DiffusionModel.from_checkpoint(checkpoint), checkpoint.vae, torch.zeros(1, SIZE, SIZE, 3))


def test_without_a_masked_image_the_inpainting_model_reads_the_latent_itself_as_comfyui_does(inpainting_file):
    """After core's SetLatentNoiseMask there is no masked image: ComfyUI's concat_cond falls back to the latent."""
    model = DiffusionModel.from_checkpoint(load_checkpoint(inpainting_file[0]))
    z, mask = torch.randn(2, 4, 16, 16), latent_mask(torch.full((1, 32, 32), 0.7), (2, 4, 16, 16))
    network = inpainting_network(model, mask, z, None)
    assert torch.equal(network.extra, torch.cat([torch.ones(2, 1, 16, 16), z], dim=1))
