"""core/unet.py against diffusers' UNet2DConditionModel, and config inference from keys and shapes."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch

from ldm_nodes.tools.randomise import randomise
from ldm_nodes.core.unet import UNetConfig, UNetModel, infer_unet_config, timestep_embedding

PREFIX = "model.diffusion_model."

# SD_REFERENCE 4.2 "Tiny variant": conv projections, num_heads.
TINY_SD1 = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(0, 1), transformer_depth=1, context_dim=32, num_heads=2)
# SD2-style: linear projections, head width; no attention at the full-resolution level; depth 2.
TINY_SD2 = UNetConfig(in_channels=3, out_channels=6, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                      attention_levels=(1, 2), transformer_depth=2, context_dim=24, num_head_channels=16,
                      use_linear_in_transformer=True)


def diffusers_unet(cfg, checkpoint):
    """diffusers' own reading of a CompVis checkpoint: its config creator and its converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    unet_params = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                       model_channels=cfg.model_channels, channel_mult=list(cfg.channel_mult),
                       num_res_blocks=cfg.num_res_blocks,
                       attention_resolutions=[2 ** i for i in cfg.attention_levels],
                       transformer_depth=cfg.transformer_depth, context_dim=cfg.context_dim,
                       use_linear_in_transformer=cfg.use_linear_in_transformer)
    if cfg.num_heads is not None:
        unet_params["num_heads"] = cfg.num_heads
    else:
        unet_params["num_head_channels"] = cfg.num_head_channels
    original_config = {"model": {"params": {
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    dcfg = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    dcfg["out_channels"] = cfg.out_channels  # the creator leaves diffusers' default of 4
    model = UNet2DConditionModel(**dcfg)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dcfg), strict=True)
    return model.eval()


@pytest.mark.parametrize("cfg, size", [(TINY_SD1, (8, 8)), (TINY_SD2, (12, 10))], ids=["sd1-conv", "sd2-linear-odd"])
def test_parity_with_diffusers(cfg, size):
    torch.manual_seed(0)
    ours = randomise(UNetModel(cfg))
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs = diffusers_unet(cfg, checkpoint)

    x = torch.randn(2, cfg.in_channels, *size)
    t = torch.tensor([999.0, 17.5])
    for length in (77, 154):
        context = torch.randn(2, length, cfg.context_dim)
        with torch.no_grad():
            got = ours(x, t, context)
            want = theirs(x, t, encoder_hidden_states=context).sample
        assert got.shape == (2, cfg.out_channels, *size)
        assert want.std() > 0.1  # the comparison is not between two near-zero tensors
        assert (got - want).abs().max() <= 1e-4


def test_timestep_embedding_formula():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 17.5, 999.0])
    got = timestep_embedding(t, 320)
    assert torch.allclose(got[:, 0], torch.cos(t)) and torch.allclose(got[:, 160], torch.sin(t))  # cos first, f_0 = 1
    want = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert (got - want).abs().max() < 1e-6  # same rounding as the original


def test_infer_sd15_config_and_layout(sd15_shapes):
    shapes = {key[len(PREFIX):]: shape for key, shape in sd15_shapes.items() if key.startswith(PREFIX)}
    assert len(shapes) == 686
    cfg = infer_unet_config(shapes)
    assert cfg == UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                             num_res_blocks=2, attention_levels=(0, 1, 2), transformer_depth=1, context_dim=768,
                             num_heads=8, use_linear_in_transformer=False)
    with torch.device("meta"):
        model = UNetModel(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 8
    assert model.output_blocks[0][0].emb_layers[1].in_features == 1280
    # eps differences hide inside the parity tolerance, so check them here (SD_REFERENCE 1.2)
    assert model.input_blocks[1][1].norm.eps == 1e-6 and model.input_blocks[1][0].in_layers[0].eps == 1e-5


def meta_shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNetModel(cfg).state_dict().items()}


SD2_LIKE = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(0,), transformer_depth=1, context_dim=1024, num_head_channels=64,
                      use_linear_in_transformer=True)


@pytest.mark.parametrize("cfg", [TINY_SD1, TINY_SD2, SD2_LIKE], ids=["sd1", "sd2", "sd2-default-heads"])
def test_infer_config_round_trip(cfg):
    heads = {"num_heads": cfg.num_heads} if cfg.num_heads else {"num_head_channels": cfg.num_head_channels}
    assert infer_unet_config(meta_shapes(cfg), **heads) == cfg
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_default_heads_follow_the_family():
    assert infer_unet_config(meta_shapes(SD2_LIKE)) == SD2_LIKE  # linear / context 1024: head width 64
    sd1_like = UNetConfig(**{**SD2_LIKE.to_dict(), "context_dim": 768, "use_linear_in_transformer": False,
                             "num_heads": 8, "num_head_channels": None})
    assert infer_unet_config(meta_shapes(sd1_like)) == sd1_like  # context 768, conv: 8 heads


def test_config_needs_exactly_one_head_setting():
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig.from_dict({**TINY_SD1.to_dict(), "num_head_channels": 16})
    with pytest.raises(ValueError, match="heads of width 64"):
        UNetModel(infer_unet_config(meta_shapes(TINY_SD1), num_head_channels=64))


def test_bfloat16_forward_is_finite_and_close():
    torch.manual_seed(0)
    model = randomise(UNetModel(TINY_SD1))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 17.5]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = model(x, t, context)
        got = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def edit(shapes, drop=(), add=None):
    out = {k: v for k, v in shapes.items() if k not in drop}
    out.update(add or {})
    return out


@pytest.mark.parametrize("change, named", [
    (dict(drop=["input_blocks.0.0.weight"]), "input_blocks.0.0.weight"),
    (dict(drop=["out.2.weight"]), "out.2.weight"),
    (dict(drop=["middle_block.1.proj_in.weight"]), "middle_block.1.proj_in.weight"),
    (dict(add={"input_blocks.0.0.weight": (32, 4)}), "input_blocks.0.0.weight"),
], ids=["no-conv-in", "no-out", "no-middle-transformer", "odd-conv-in"])
def test_infer_rejects_what_it_cannot_place(change, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        infer_unet_config(edit(meta_shapes(TINY_SD1), **change), num_heads=2)
