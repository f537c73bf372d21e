"""GroupNorm computed in float32, shared by the UNet and the autoencoder."""
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the module's dtype, then cast back, as Stable Diffusion
    does: fp16 statistics over large feature maps overflow."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def group_norm(channels, eps=1e-5):
    """GroupNorm(32 groups, channels): eps 1e-5 in the UNet's ResBlocks, 1e-6 in its transformers and the autoencoder."""
    return GroupNorm32(32, channels, eps=eps)
