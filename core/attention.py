"""The one attention function every module uses (UNet, autoencoder, text encoder).

Scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), through
torch's fused `scaled_dot_product_attention`, so the fastest kernel for the device is picked.
"""
import torch.nn.functional as F


def attention(q, k, v, heads, *, causal=False):
    """Multi-head attention over token-major tensors.

    q: [B, N, heads * d]; k, v: [B, M, heads * d]. Returns [B, N, heads * d].
    `causal` masks each query from the keys after it (the CLIP text encoder's mask).
    """
    b, n, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, width)
