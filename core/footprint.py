"""Working sets of the layers a forward pass in inference mode runs, in bytes, from shapes alone: the
terms of core/memory.py's estimate (its docstring derives them), shared by each family's own estimate.

B images of C channels over P positions (M keys for attention), s bytes per element."""
from .attention import query_chunk

CONV_LIVE = 4  # a convolution level holds its input, normalisation and activation, output and residual sum


def conv_bytes(b, c, positions, s):
    return CONV_LIVE * b * c * positions * s


def attention_bytes(b, heads, n, m, c, s):
    return 2 * b * heads * query_chunk(b, heads, n, m, s) * m * s + 5 * b * n * c * s


def feed_forward_bytes(b, n, c, hidden, s):
    return b * n * (3 * hidden + 2 * c) * s
