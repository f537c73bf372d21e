"""The denoiser families, one entry each: the only place that lists them.

A family is one module (its config dataclass with to_dict/from_dict, its network, the config inferred
from a state dict's shapes, and `activation_peak`, its memory estimate) plus one `Family` entry below.
The loader, the header check, the memory check and the trainer read everything family-specific from
here. To add one:
  1. write core/<family>.py with those four pieces (core/transformer.py is the example);
  2. add its entry to FAMILIES: how to recognise its state dict, its downsampling, the blocks that
     gradient checkpointing wraps, and the size `train --denoiser NAME` builds.
Header bounds on its config's integer fields come from core/checkpoint.py's shared field limits (a
field it does not list is bounded like a width); a file names its family in its metadata ("family").
"""
from dataclasses import dataclass
from typing import Callable

from . import transformer, unet


@dataclass(frozen=True)
class Family:
    name: str                    # the metadata's "family" value; the family's config sits under this key
    config: type                 # the config dataclass (from_dict, to_dict)
    network: type                # the nn.Module built from a config
    infer_config: Callable       # {key: shape} of a state dict without our metadata -> config
    detect: Callable             # {key: shape} -> True when a state dict is this family's
    downsampling: Callable       # config -> the factor between the latent's size and the network's coarsest grid
    blocks: Callable             # network -> the blocks gradient checkpointing wraps, in order
    activation_peak: Callable    # (config, batch, h, w, bytes per element, context tokens) -> peak bytes
    tiny: object                 # the config `train --denoiser NAME` builds (the built-in size; models/README.md)


FAMILIES = {family.name: family for family in (
    Family("unet", unet.UNetConfig, unet.UNetModel, unet.infer_unet_config,
           detect=lambda shapes: "input_blocks.0.0.weight" in shapes,
           downsampling=lambda config: 2 ** (len(config.channel_mult) - 1),
           blocks=lambda network: [*network.input_blocks, network.middle_block, *network.output_blocks],
           activation_peak=unet.activation_peak,
           # three levels, attention at 8x8 and 4x4 of a 16x16 latent
           tiny=unet.UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2),
                                num_res_blocks=1, attention_levels=(1, 2), transformer_depth=1, context_dim=64,
                                num_head_channels=32)),
    Family("transformer", transformer.TransformerConfig, transformer.TransformerModel,
           transformer.infer_transformer_config,
           detect=lambda shapes: "patch_embed.weight" in shapes,
           downsampling=lambda config: config.patch_size,
           blocks=lambda network: list(network.blocks),
           activation_peak=transformer.activation_peak,
           # PixArt-style, 2x2 latent patches (64 tokens for a 16x16 latent)
           tiny=transformer.TransformerConfig(in_channels=4, out_channels=4, width=192, depth=6, heads=3,
                                              context_dim=64, patch_size=2, base_size=8)),
)}
DEFAULT = "unet"  # a state dict no family recognises is read as SD1.x's UNet (and refused by its layout check)


def detect(shapes):
    """The family name of a state dict without our metadata, from its keys."""
    return next((name for name, family in FAMILIES.items() if family.detect(shapes)), DEFAULT)


def family_of(network_or_config):
    """The Family of a network or config."""
    config = getattr(network_or_config, "config", network_or_config)
    for family in FAMILIES.values():
        if isinstance(config, family.config):
            return family
    raise TypeError(f"{type(network_or_config).__name__} is no registered denoiser family's")
