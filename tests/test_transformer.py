"""core/transformer.py against diffusers' PixArtTransformer2DModel, and config inference from keys and shapes."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re

import pytest
import torch

from ldm_nodes.core import transformer
from ldm_nodes.tools.randomise import randomise
from ldm_nodes.core.transformer import (TransformerConfig, TransformerModel, infer_transformer_config,
                                        pos_embed_2d)

# diffusers' PixArt-alpha default for sample_size 16: base grid 16 // 2 = 8 patches, interpolation scale 1.
TINY = TransformerConfig(in_channels=4, out_channels=4, width=64, depth=2, heads=2, context_dim=32,
                         patch_size=2, base_size=8, interpolation_scale=1.0)
# patch 1, three heads of 16, an explicit interpolation scale of 2 (as PixArt's 1024 px model has).
TINY_P1 = TransformerConfig(in_channels=3, out_channels=3, width=48, depth=1, heads=3, context_dim=24,
                            patch_size=1, base_size=8, interpolation_scale=2.0)

# diffusers name -> ours. Everything else in diffusers' PixArt with norm_type "ada_norm_single" and
# use_additional_conditions=False has no parameters (LayerNorms without affine; the position table is
# a non-persistent buffer that we compute at run time).
RENAMES = [
    (r"^pos_embed\.proj\.", "patch_embed."),
    (r"^adaln_single\.emb\.timestep_embedder\.linear_1\.", "time_embed.0."),
    (r"^adaln_single\.emb\.timestep_embedder\.linear_2\.", "time_embed.2."),
    (r"^adaln_single\.linear\.", "time_modulation."),
    (r"^caption_projection\.linear_1\.", "caption_proj.0."),
    (r"^caption_projection\.linear_2\.", "caption_proj.2."),
    (r"^transformer_blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.scale_shift_table"),
    (r"^transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.to_out."),
    (r"^transformer_blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),  # to_q, to_k, to_v
    (r"^transformer_blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.to_out."),
    (r"^transformer_blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.2."),
    (r"^scale_shift_table$", "final_scale_shift_table"),
    (r"^proj_out\.", "final_linear."),
]


def convert_from_diffusers(state_dict):
    """diffusers PixArtTransformer2DModel state dict -> ours. Tensors are copied as they are: the row
    order of the scale-shift tables (shift, scale, gate, ...), of the 6 * width modulation and of
    proj_out's (patch row, patch column, channel) outputs is the same in both layouts."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"no mapping for diffusers key {key!r}")
    return out


def diffusers_pixart(cfg):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth, cross_attention_dim=cfg.width,
        sample_size=cfg.base_size * cfg.patch_size, patch_size=cfg.patch_size, norm_type="ada_norm_single",
        use_additional_conditions=False, caption_channels=cfg.context_dim,
        interpolation_scale=cfg.interpolation_scale if cfg.interpolation_scale != 1 else None)


@pytest.mark.parametrize("cfg, sizes", [(TINY, [(16, 16), (16, 12)]), (TINY_P1, [(8, 6), (10, 10)])],
                         ids=["p2-square-and-16x12", "p1-scale2-other-sizes"])
def test_parity_with_diffusers(cfg, sizes):
    theirs = randomise(diffusers_pixart(cfg), seed=1)
    ours = TransformerModel(cfg).eval()
    ours.load_state_dict(convert_from_diffusers(theirs.state_dict()), strict=True)
    # an eps of 1e-5 instead of 1e-6 would hide inside the tolerance: check it here
    assert theirs.transformer_blocks[0].norm1.eps == theirs.norm_out.eps == transformer.LN_EPS == 1e-6

    g = torch.Generator().manual_seed(2)
    t = torch.tensor([999.0, 500.5, 3.0])
    for size in sizes:  # the first is the trained size (diffusers' stored table), then an interpolated grid
        x = torch.randn(3, cfg.in_channels, *size, generator=g)
        for length in (77, 154):
            context = torch.randn(3, length, cfg.context_dim, generator=g)
            with torch.no_grad():
                got = ours(x, t, context)
                want = theirs(x, encoder_hidden_states=context, timestep=t,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            assert got.shape == want.shape == (3, cfg.out_channels, *size)
            assert want.std() > 0.1  # not two near-zero tensors
            assert (got - want).abs().max() <= 1e-4, (size, length, (got - want).abs().max().item())


def test_output_depends_on_timestep_context_and_position():
    """Guards against a parity that holds only because some path is dead in both models."""
    torch.manual_seed(0)
    model = randomise(TransformerModel(TINY))
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = model(x, torch.tensor([500.0]), ctx)
        assert (model(x, torch.tensor([20.0]), ctx) - base).abs().max() > 1e-2
        assert (model(x, torch.tensor([500.0]), torch.randn(1, 77, 32)) - base).abs().max() > 1e-2
        # a constant latent: only the positions tell the patches apart
        flat = model(torch.zeros(1, 4, 16, 16), torch.tensor([500.0]), ctx)
        assert flat[..., ::2, ::2].std(dim=(2, 3)).min() > 1e-2


@pytest.mark.parametrize("h, w, base, scale", [(8, 8, 8, 1.0), (8, 6, 8, 1.0), (5, 12, 16, 2.0), (64, 64, 64, 2.0)])
def test_pos_embed_matches_diffusers(h, w, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    want = get_2d_sincos_pos_embed(48, (h, w), base_size=base, interpolation_scale=scale).float()
    got = pos_embed_2d(48, h, w, base, scale)
    assert got.shape == (h * w, 48)
    assert torch.equal(got, want)


def test_timestep_features_are_pixarts():
    """PixArt's Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) is the formula the transformer
    uses (core.unet's: cos first, f_i = exp(-ln(10000) i / half))."""
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0.0, 3.0, 500.5, 999.0])
    assert (transformer.timestep_embedding(t, 256) - Timesteps(256, True, 0)(t)).abs().max() < 1e-6


def meta_shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in TransformerModel(cfg).state_dict().items()}


PIXART_XL = TransformerConfig(in_channels=4, out_channels=4, width=1152, depth=28, heads=16, context_dim=4096,
                              patch_size=2, base_size=64, interpolation_scale=2.0)
ODD_MLP = TransformerConfig(in_channels=16, out_channels=32, width=96, depth=3, heads=6, context_dim=768,
                            patch_size=4, mlp_ratio=2.5, base_size=12, interpolation_scale=0.5, frequency_dim=128)


@pytest.mark.parametrize("cfg", [TINY, PIXART_XL, ODD_MLP], ids=["tiny", "pixart-xl", "odd-mlp"])
def test_infer_config_round_trip(cfg):
    shapes = meta_shapes(cfg)
    got = infer_transformer_config(shapes, heads=cfg.heads, base_size=cfg.base_size,
                                   interpolation_scale=cfg.interpolation_scale)
    assert got == cfg
    assert meta_shapes(got) == shapes
    assert TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_default_heads_and_positions():
    got = infer_transformer_config(meta_shapes(PIXART_XL))
    assert got.heads == 1152 // 64 and (got.base_size, got.interpolation_scale) == (16, 1.0)
    assert infer_transformer_config(meta_shapes(TINY)).heads == 1  # 64 // 64
    assert infer_transformer_config(meta_shapes(TINY_P1)).heads == 1  # 48: not a multiple of 64


@pytest.mark.parametrize("key", ["patch_embed.weight", "final_linear.weight", "caption_proj.0.weight",
                                 "blocks.0.mlp.0.weight", "time_embed.0.weight"])
def test_infer_names_a_missing_key(key):
    shapes = meta_shapes(TINY)
    del shapes[key]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        infer_transformer_config(shapes, heads=2)


def test_infer_rejects_odd_shapes():
    with pytest.raises(ValueError, match="patch_embed.weight"):
        infer_transformer_config({**meta_shapes(TINY), "patch_embed.weight": (64, 4)}, heads=2)
    with pytest.raises(ValueError, match="final_linear.weight"):
        infer_transformer_config({**meta_shapes(TINY), "final_linear.weight": (15, 64)}, heads=2)


def test_config_checks_heads_and_width():
    with pytest.raises(ValueError, match="3 heads"):
        TransformerConfig.from_dict({**TINY.to_dict(), "heads": 3})
    with pytest.raises(ValueError, match="multiple of 4"):
        TransformerConfig.from_dict({**TINY.to_dict(), "width": 66, "heads": 1})


@pytest.mark.parametrize("size", [(15, 16), (16, 9)])
def test_latent_size_must_be_a_multiple_of_the_patch(size):
    model = TransformerModel(TINY)
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}.*patch size 2"):
        model(torch.randn(1, 4, *size), torch.tensor([1.0]), torch.randn(1, 5, 32))


def test_bfloat16_forward_is_finite_and_close():
    torch.manual_seed(0)
    model = randomise(TransformerModel(TINY))
    x, t, context = torch.randn(2, 4, 16, 12), torch.tensor([999.0, 3.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = model(x, t, context)
        got = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_the_denoiser_drives_it_with_guidance():
    """Same call as UNetModel: the Denoiser's batched cond/uncond call with contexts of different lengths."""
    from ldm_nodes.core.denoiser import Denoiser
    from ldm_nodes.core.schedule import TrainingSchedule

    torch.manual_seed(0)
    model = randomise(TransformerModel(TINY))
    cond, uncond = torch.randn(1, 7, 32), torch.randn(1, 5, 32)
    x = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        got = Denoiser(model, TrainingSchedule("scaled_linear"), "v", cond, uncond, cfg=3.0)(x, 2.0)
        assert got.shape == x.shape and torch.isfinite(got).all()
        plain = Denoiser(model, TrainingSchedule("scaled_linear"), "v", cond)(x, 2.0)
    assert (got - plain).abs().max() > 1e-3  # the guidance reached the network's context


@pytest.mark.parametrize("context_dim, width", [(64, 192), (768, 384), (4096, 1152)])
def test_fresh_model_hears_the_caption_at_any_width(context_dim, width):
    """From scratch, each block is the identity and the output 0 (adaLN-Zero), while the caption and
    timestep MLPs carry unit-variance features at unit scale whatever their widths: PixArt's N(0, 0.02)
    scales a 64-wide caption down about 30 times, so attention to it started uniform and position
    words went unlearned."""
    torch.manual_seed(0)
    model = TransformerModel(TransformerConfig(4, 4, width, 1, width // 64, context_dim))
    with torch.no_grad():
        caption = model.caption_proj(torch.randn(4, 77, context_dim))
        features = transformer.timestep_embedding(torch.linspace(0, 999, 64), model.config.frequency_dim)
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 77, context_dim))
    assert 0.3 < caption.std() < 3
    assert 0.3 < model.time_embed[0](features).std() / features.std() < 3
    assert torch.count_nonzero(out) == 0
