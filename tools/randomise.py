"""Random weights for parity tests and speed benchmarks.

Freshly built models are a poor oracle input: zero-initialised layers (the UNet's output convs,
adaLN-Zero modulation, PixArt's output layer) make a parity test vacuous, and unit norm scales hide
a swapped parameter. This redraws every parameter from a seeded generator, keeping activations O(1).
"""
import torch
from torch import nn

NORMS = (nn.GroupNorm, nn.LayerNorm)


def randomise(model, seed=0):
    """Redraw every parameter of `model` in place and return it in eval mode: norm scales
    1 + N(0, 0.1^2), other weights N(0, 1 / fan_in), everything else (biases, tables) N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                if isinstance(module, NORMS) and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif name == "weight":
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * noise)
    return model.eval()
