"""A transformer denoiser over latent patches: the PixArt-alpha block (Chen et al. 2023, section 2.3).

eps_theta(x, t, context) (or v, as the checkpoint's prediction type says; the network is the same):

    tokens   = patch_embed(x) + pos(h, w)             conv p x p, stride p: [B, C, H, W] -> [B, h*w, width],
                                                      h = H / p, w = W / p; 2-D sin-cos positions
    e        = time_embed(sinusoid(t))                 ONE timestep MLP shared by every block  [B, width]
    m        = time_modulation(SiLU(e))                adaLN-single: [B, 6 * width], shared too
    c        = caption_proj(context)                  Linear, GELU(tanh), Linear: text width -> width
    per block i, with (shift1, scale1, gate1, shift2, scale2, gate2) = blocks.i.scale_shift_table + m:
        tokens += gate1 * self_attn(LN(tokens) * (1 + scale1) + shift1)
        tokens += cross_attn(tokens, c)                (no norm before the cross-attention, as in PixArt)
        tokens += gate2 * mlp(LN(tokens) * (1 + scale2) + shift2)      mlp: Linear, GELU(tanh), Linear
    (shift, scale) = final_scale_shift_table + e       the raw embedding e, not m
    out      = unpatchify(final_linear(LN(tokens) * (1 + scale) + shift))     -> [B, out_channels, H, W]

LN is LayerNorm without affine parameters, eps 1e-6. The per-block table is PixArt's "layer-specific
learnable embedding" that replaces DiT's per-block adaLN MLP; only `time_modulation` sees the
timestep. Parameter names are our own (there is no CompVis layout for this family); the test's
converter documents the mapping to diffusers' PixArtTransformer2DModel.

Positions (`pos_embed_2d`) are computed for the latent's own patch grid at run time, not stored: the
row and column indices are rescaled so the grid always spans `base_size / interpolation_scale`
position units, whatever its size (PixArt's base-size interpolation), i.e. column j of w sits at
j * base_size / (w * interpolation_scale). At h = w = base_size and the same scale this is exactly
the table of a model trained at that size.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .footprint import attention_bytes, feed_forward_bytes
from .unet import timestep_embedding

LN_EPS = 1e-6


@dataclass
class TransformerConfig:
    """Hyperparameters of TransformerModel (PixArt-alpha XL/2 at 512 px: 4, 4, 2, 1152, 28, 16, 4096,
    4.0, base_size=32, interpolation_scale=1.0; diffusers' learned sigma is not carried: out_channels
    is the prediction's own channel count).

    base_size: patches per side of the grid the positions are scaled to (diffusers: sample_size //
    patch_size); interpolation_scale: positions are divided by it (diffusers' default
    max(sample_size // 64, 1)). frequency_dim: width of the sinusoidal timestep features (256).
    """
    in_channels: int
    out_channels: int
    width: int
    depth: int
    heads: int
    context_dim: int
    patch_size: int = 2
    mlp_ratio: float = 4.0
    base_size: int = 16
    interpolation_scale: float = 1.0
    frequency_dim: int = 256

    def __post_init__(self):
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"TransformerConfig: width {self.width} does not split into {self.heads} heads")
        if self.width % 4:
            raise ValueError(f"TransformerConfig: width {self.width} is not a multiple of 4 "
                             "(the 2-D sin-cos position embedding needs sin and cos for rows and columns)")
        if self.frequency_dim % 2:
            raise ValueError(f"TransformerConfig: frequency_dim {self.frequency_dim} is odd")

    @property
    def mlp_width(self):
        return round(self.width * self.mlp_ratio)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def pos_embed_2d(width, h, w, base_size, interpolation_scale, device=None):
    """2-D sin-cos position embedding of an h x w patch grid, row-major tokens -> [h*w, width] float32.

    Position of row i: y_i = i / (h / base_size) / interpolation_scale; of column j: x_j likewise with w.
    With q = width / 4 and omega_k = 10000^(-k / q), k in [0, q):
        pos(i, j) = [sin(x_j omega), cos(x_j omega), sin(y_i omega), cos(y_i omega)]
    (column half first, as PixArt / MAE's table is laid out). The grid is computed in float32 and the
    sinusoids in float64 (on the CPU, so devices without float64 give the same table), then cast.
    """
    ys = torch.arange(h, dtype=torch.float32) / (h / base_size) / interpolation_scale
    xs = torch.arange(w, dtype=torch.float32) / (w / base_size) / interpolation_scale
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / (quarter * 1.0))

    def sincos(pos):  # [h, w] float32 -> [h*w, 2 * quarter] float64
        args = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    table = torch.cat([sincos(grid_x), sincos(grid_y)], dim=1).float()
    return table if device is None else table.to(device)


class Attention(nn.Module):
    """Multi-head attention with biased projections; K, V from `context` (x itself for self-attention)."""

    def __init__(self, width, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or width
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(context_dim, width)
        self.to_v = nn.Linear(context_dim, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


def _modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * (1 + scale) + shift


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention, MLP; adaLN-single modulation from the shared timestep vector."""

    def __init__(self, width, heads, mlp_width):
        super().__init__()
        # rows: shift, scale, gate of the attention; shift, scale, gate of the MLP
        self.scale_shift_table = nn.Parameter(torch.randn(6, width) / width ** 0.5)
        self.self_attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads)  # the caption is projected to `width` beforehand
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(approximate="tanh"), nn.Linear(mlp_width, width))

    def forward(self, x, modulation, context):
        """x [B, N, width]; modulation [B, 6, width] (the shared time_modulation output); context [B, L, width]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + modulation).chunk(6, dim=1)
        x = x + gate1 * self.self_attn(_modulate(x, shift1, scale1))
        x = x + self.cross_attn(x, context)
        return x + gate2 * self.mlp(_modulate(x, shift2, scale2))


class TransformerModel(nn.Module):
    """eps_theta(x, t, context): x [B, in, H, W] with H, W multiples of patch_size, t float [B] (fractional
    allowed), context [B, L, context_dim] of any L. Inputs in the module's dtype (t may stay float32).
    Returns [B, out_channels, H, W]. Same call as UNetModel, so the same Denoiser drives either."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        width, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, width, p, stride=p)
        self.time_embed = nn.Sequential(nn.Linear(cfg.frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.time_modulation = nn.Linear(width, 6 * width)  # applied to SiLU(time_embed(...))
        self.caption_proj = nn.Sequential(nn.Linear(cfg.context_dim, width), nn.GELU(approximate="tanh"),
                                          nn.Linear(width, width))
        self.blocks = nn.ModuleList(TransformerBlock(width, cfg.heads, cfg.mlp_width) for _ in range(cfg.depth))
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, width) / width ** 0.5)  # rows: shift, scale
        # output features ordered (row in patch, column in patch, channel), channel fastest
        self.final_linear = nn.Linear(width, p * p * cfg.out_channels)
        self._pos_cache = {}
        self._initialize()

    @torch.no_grad()
    def _initialize(self):
        """PixArt-alpha's initialisation for training from scratch (its `initialize_weights`), but with
        the timestep and caption MLPs scaled to their width: Xavier linears and patch embedding, and
        zeros for the time modulation, every cross-attention output and the final linear, so each block
        starts as the identity and the network predicts 0.

        PixArt draws the two MLPs from N(0, 0.02), a gain of 0.02 sqrt(fan_in) per layer: about 1.3 for
        its 4096-wide T5 features, but 0.16 for a 64-wide text encoder. The caption then reaches the
        cross-attention about 30 times too small, its softmax stays uniform over the 77 tokens, and a
        word that changes few of them (a position) goes unheard: a tiny model trained that way learned
        colors but ignored positions after 8,000 steps. Here N(0, 1 / fan_in), a gain of 1 at any width."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        for linear in (self.time_embed[0], self.time_embed[2], self.caption_proj[0], self.caption_proj[2]):
            nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
        for linear in (self.time_modulation, self.final_linear, *(b.cross_attn.to_out for b in self.blocks)):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def pos_embed(self, h, w, device):
        """The float32 position table of an h x w patch grid, cached per grid size and device."""
        key = (h, w, str(device))
        if key not in self._pos_cache:
            if len(self._pos_cache) >= 8:
                self._pos_cache.clear()
            cfg = self.config
            self._pos_cache[key] = pos_embed_2d(cfg.width, h, w, cfg.base_size, cfg.interpolation_scale, device)
        return self._pos_cache[key]

    def forward(self, x, timesteps, context):
        cfg, p = self.config, self.config.patch_size
        b, _, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"TransformerModel: latent size {height}x{width} is not a multiple of the "
                             f"patch size {p}")
        h, w = height // p, width // p

        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, h*w, width], row-major
        tokens = (tokens + self.pos_embed(h, w, x.device)).to(x.dtype)

        t_emb = timestep_embedding(timesteps.reshape(-1).expand(b), cfg.frequency_dim).to(x.dtype)
        emb = self.time_embed(t_emb)  # [B, width]
        modulation = self.time_modulation(F.silu(emb)).reshape(b, 6, cfg.width)
        context = self.caption_proj(context)

        for block in self.blocks:
            tokens = block(tokens, modulation, context)

        shift, scale = (self.final_scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        out = self.final_linear(_modulate(tokens, shift, scale))  # [B, h*w, p*p*c]
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)  # unpatchify


def default_heads(width):
    """Heads when the checkpoint does not say: heads of width 64 where width is a multiple of 64, else one."""
    return width // 64 if width % 64 == 0 else 1


def infer_transformer_config(shapes, heads=None, *, base_size=None, interpolation_scale=None):
    """TransformerConfig from a state dict's {key: shape} (our key names).

    Sizes come from the shapes: patch_embed.weight [width, in, p, p], final_linear.weight
    [p*p*out, width], caption_proj.0.weight [width, context_dim], blocks.0.mlp.0.weight
    [mlp_width, width], time_embed.0.weight [width, frequency_dim]; depth counts blocks.N. What the
    shapes cannot tell comes from the arguments (our checkpoint metadata): heads (default
    `default_heads(width)`), base_size and interpolation_scale (default: the dataclass's, 16 and 1.0).
    """
    shapes = {k: tuple(s) for k, s in shapes.items()}

    def need(key, ndim):
        if key not in shapes:
            raise ValueError(f"transformer state dict: missing key {key!r}")
        if len(shapes[key]) != ndim:
            raise ValueError(f"transformer state dict: {key!r} has shape {list(shapes[key])}, expected {ndim} dims")
        return shapes[key]

    width, in_channels, p, p2 = need("patch_embed.weight", 4)
    if p != p2:
        raise ValueError(f"transformer state dict: 'patch_embed.weight' has a non-square patch {p}x{p2}")
    out_features = need("final_linear.weight", 2)[0]
    if out_features % (p * p):
        raise ValueError(f"transformer state dict: 'final_linear.weight' has {out_features} outputs, "
                         f"not a multiple of patch_size^2 = {p * p}")
    context_dim = need("caption_proj.0.weight", 2)[1]
    mlp_width = need("blocks.0.mlp.0.weight", 2)[0]
    frequency_dim = need("time_embed.0.weight", 2)[1]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})

    defaults = TransformerConfig.__dataclass_fields__
    return TransformerConfig(
        in_channels=in_channels, out_channels=out_features // (p * p), width=width, depth=depth,
        heads=default_heads(width) if heads is None else heads, context_dim=context_dim, patch_size=p,
        mlp_ratio=mlp_width / width,
        base_size=defaults["base_size"].default if base_size is None else base_size,
        interpolation_scale=defaults["interpolation_scale"].default if interpolation_scale is None
        else interpolation_scale,
        frequency_dim=frequency_dim)


def activation_peak(config, b, h, w, s, context_tokens):
    """Peak bytes of one forward pass in inference mode (core/memory.py): the token stream plus the
    largest working set."""
    n = math.ceil(h / config.patch_size) * math.ceil(w / config.patch_size)
    tokens = 3 * b * n * config.width * s  # the residual stream, its modulated copy and the block's output
    return tokens + max(attention_bytes(b, config.heads, n, n, config.width, s),
                        attention_bytes(b, config.heads, n, context_tokens, config.width, s),
                        feed_forward_bytes(b, n, config.width, config.mlp_width, s))
