"""The KL autoencoder: parity with diffusers, SD1.5 layout, config inference, posterior, tiled decoding."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch
import torch.nn.functional as F

from ldm_nodes.core.autoencoder import (AutoencoderConfig, AutoencoderKL, DiagonalGaussian, blend_weights,
                                        infer_autoencoder_config)
from ldm_nodes.tools.randomise import randomise

TINY = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY3 = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [TINY, TINY3], ids=["2 levels", "3 levels"])
def test_parity_with_diffusers(config):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = randomise(AutoencoderKL(config))
    n = len(config.ch_mult)
    diffusers_config = dict(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.z_channels,
        block_out_channels=[config.ch * m for m in config.ch_mult], layers_per_block=config.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        norm_num_groups=32, scaling_factor=config.scale_factor)
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    theirs = DiffusersAutoencoderKL(**diffusers_config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, diffusers_config), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x[1] *= 1e-3    # nearly flat: GroupNorm variances of ~1e-6 make its eps (1e-6) matter
    z = torch.randn(2, config.embed_dim, 6, 5, generator=g)
    with torch.no_grad():
        posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
        decoded, decoded_reference = ours.decode(z), theirs.decode(z).sample
    assert posterior.mean.shape == (2, config.embed_dim, 16 // config.f, 16 // config.f)
    assert decoded.shape == (2, 3, 6 * config.f, 5 * config.f)
    assert posterior.mean.std() > 0.1 and decoded.std() > 0.1          # not a trivially constant output
    assert (posterior.mean - reference.mean).abs().max() <= 1e-4
    assert (posterior.std - reference.std).abs().max() <= 1e-4
    assert (decoded - decoded_reference).abs().max() <= 1e-4


def test_sd15_config_and_layout(sd15_shapes):
    prefix = "first_stage_model."
    shapes = {key[len(prefix):]: shape for key, shape in sd15_shapes.items() if key.startswith(prefix)}
    config = infer_autoencoder_config(shapes)
    assert config == AutoencoderConfig(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                       attn_levels=(), z_channels=4, embed_dim=4, double_z=True, scale_factor=0.18215)
    assert config.f == 8
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert shapes_of(model) == shapes


@pytest.mark.parametrize("config", [
    TINY,
    TINY3,
    AutoencoderConfig(in_channels=1, out_channels=2, ch=32, ch_mult=(2, 1, 3), num_res_blocks=3,
                      attn_levels=(0, 2), z_channels=3, embed_dim=5, scale_factor=0.5),
])
def test_config_inference_round_trip(config):
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert infer_autoencoder_config(shapes_of(model), scale_factor=config.scale_factor) == config
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_inference_names_bad_keys():
    with torch.device("meta"):
        shapes = shapes_of(AutoencoderKL(TINY))
    del shapes["decoder.conv_in.weight"]
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        infer_autoencoder_config(shapes)
    shapes["decoder.conv_in.weight"] = (64, 3, 3, 3)          # z_channels 3, but conv_out gives 8 = 2 * 4
    with pytest.raises(ValueError, match="encoder.conv_out.weight"):
        infer_autoencoder_config(shapes)


def test_attention_levels_are_used():
    config = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))
    model = randomise(AutoencoderKL(config))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        before = model.encode(x).mean, model.decode(z)
        # a weight, not a bias: a uniform shift would be undone by the next GroupNorm
        for attn in (model.encoder.down[1].attn[0], model.decoder.up[1].attn[1]):
            attn.proj_out.weight.add_(torch.randn_like(attn.proj_out.weight))
        after = model.encode(x).mean, model.decode(z)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_bfloat16_runs_with_float32_group_norm():
    """GroupNorm upcasts to float32 and hands back the module's dtype, so a bf16 model runs end to end."""
    model = randomise(AutoencoderKL(TINY))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        reference = model.decode(z)
        model.to(torch.bfloat16)
        posterior = model.encode(x.bfloat16())
        decoded = model.decode(z.bfloat16())
    assert posterior.sample(torch.Generator().manual_seed(0)).dtype == torch.bfloat16
    assert decoded.dtype == torch.bfloat16
    assert (decoded.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_posterior_sample_is_seeded():
    posterior = DiagonalGaussian(torch.randn(2, 8, 3, 3))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, posterior.mean + posterior.std * eps)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_posterior_kl_closed_form():
    moments = torch.randn(3, 8, 4, 5, generator=torch.Generator().manual_seed(0)) * 2
    moments[0, 4, 0, 0] = 50.0                                  # logvar clamped to 20
    posterior = DiagonalGaussian(moments)
    mu, logvar = moments.double().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    expected = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    assert torch.allclose(posterior.kl().double(), expected, rtol=1e-5)
    assert posterior.logvar.max() == 20.0


@pytest.mark.parametrize("size, tile, overlap, f", [
    (8, 8, 2, 8), (20, 8, 2, 2), (15, 8, 2, 1), (9, 8, 3, 4), (64, 16, 7, 8),
])
def test_blend_weights_sum_to_one(size, tile, overlap, f):
    total = torch.zeros(f * size, dtype=torch.float64)
    tiles = blend_weights(size, tile, overlap, f)
    for start, weight in tiles:
        assert len(weight) == f * min(tile, size) and weight.min() >= 0
        total[f * start:f * start + len(weight)] += weight
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-12)
    assert tiles[-1][0] + min(tile, size) == size
    assert all(b - a <= tile - overlap for (a, _), (b, _) in zip(tiles, tiles[1:]))


def test_decode_tiled_one_tile_is_exact():
    model = randomise(AutoencoderKL(TINY))
    z = torch.randn(1, 4, 6, 5)
    with torch.no_grad():
        assert torch.equal(model.decode_tiled(z, tile=6, overlap=2), model.decode(z))


def test_decode_tiled_places_tiles_exactly_for_a_local_decoder():
    """With a decoder that is local (nearest upsampling), tiling is exact: any misplaced tile or weight shows."""
    model = AutoencoderKL(TINY)
    model.decode = lambda z: F.interpolate(z[:, :3], scale_factor=model.config.f, mode="nearest")
    z = torch.randn(2, 4, 23, 17)
    assert torch.allclose(model.decode_tiled(z, tile=8, overlap=3), model.decode(z), atol=1e-6)


def test_decode_tiled_is_close_to_decode():
    """A real decoder cannot be tiled exactly: a tile's border pixels see zero padding inside the receptive
    field (about 12 latent pixels here), and GroupNorm statistics and the mid block's attention cover one
    tile, not the whole latent. A random model is much less local than a trained one (decoding a 16x16
    crop alone is off by ~15% of the image's spread even at the crop's centre), so the bound is loose.

    What blending guarantees exactly: the weights are a partition of unity, so at every pixel the error is
    at most the weighted error of the tiles that cover it, sum_i w_i |D(tile_i) - D(z)|.
    """
    model = randomise(AutoencoderKL(TINY))
    f, tile, overlap = TINY.f, 24, 8
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.decode(z)
        error = (model.decode_tiled(z, tile=tile, overlap=overlap) - full).abs()
        bound = torch.zeros_like(full)
        for y0, wy in blend_weights(32, tile, overlap, f):
            for x0, wx in blend_weights(32, tile, overlap, f):
                rows, cols = slice(f * y0, f * y0 + len(wy)), slice(f * x0, f * x0 + len(wx))
                tile_error = (model.decode(z[:, :, y0:y0 + tile, x0:x0 + tile]) - full[:, :, rows, cols]).abs()
                bound[:, :, rows, cols] += (wy[:, None] * wx[None, :]).float() * tile_error
    assert error.max() > 0                                       # 4 tiles, so not the one-tile path
    assert (error <= bound + 1e-5).all()
    assert error.mean() < 0.1 * full.std() and error.max() < full.std()   # measured: 0.06 and 0.46


def test_encode_rejects_sizes_not_multiple_of_f():
    model = AutoencoderKL(TINY3)
    with pytest.raises(ValueError, match=r"12x10.*f = 4"):
        model.encode(torch.zeros(1, 3, 12, 10))
