"""The one attention function every module uses (UNet, autoencoder, text encoder).

Scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), through
torch's fused `scaled_dot_product_attention`, so the fastest kernel for the device is picked.

Long sequences are chunked: when the scores of one call would exceed CHUNK_BYTES, the queries are
split into chunks whose scores fit, so memory grows linearly in the sequence instead of
quadratically (the fused kernel is not always chosen: on the CPU a single 64-wide head, as in the
autoencoder's mid block, takes the path that materialises all N x M scores). Each query's softmax
runs over all keys either way, so chunking gives the same result. On CUDA, heads up to
FUSED_HEAD_WIDTH wide always run in one call: the fused kernels there never hold the scores, and
splitting them would only cost speed.
"""
import torch
import torch.nn.functional as F
from einops import rearrange

CHUNK_BYTES = 32 * 2**20  # the largest score matrix [B, heads, chunk, M] one call may hold
FUSED_HEAD_WIDTH = 128


def attention(q, k, v, heads, *, causal=False):
    """Multi-head attention over token-major tensors.

    q: [B, N, heads * d]; k, v: [B, M, heads * d]. Returns [B, N, heads * d].
    `causal` masks each query from the keys after it (the CLIP text encoder's mask).
    """
    n = q.shape[1]
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    b, _, _, d = q.shape
    chunk = query_chunk(b, heads, n, k.shape[2], q.element_size())
    if causal or chunk >= n or (q.is_cuda and d <= FUSED_HEAD_WIDTH):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v) for i in range(0, n, chunk)], 2)
    return rearrange(out, "b h n d -> b n (h d)")


def query_chunk(batch, heads, n, m, itemsize):
    """Queries per call so that the scores [batch, heads, chunk, m] stay within CHUNK_BYTES (at least 1)."""
    return max(1, min(n, CHUNK_BYTES // (batch * heads * m * itemsize)))
