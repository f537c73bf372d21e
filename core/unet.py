"""The conditioned denoiser of latent diffusion: eps_theta(z_t, t, tau(y)) (Rombach et al. 2022, eq. 3).

A UNet (Ronneberger et al. 2015) of ResBlocks with a sinusoidal timestep embedding (Ho et al. 2020,
appendix B), with SpatialTransformers at chosen resolutions that cross-attend to the text encoding
(LDM section 3.3). Module and parameter names follow the original CompVis layout (SD_REFERENCE.md
1.2), so the `model.diffusion_model.*` part of an SD1.x checkpoint loads with no rename table:

    input_blocks.0          conv_in, 3x3
    input_blocks.1..        per level: num_res_blocks x [ResBlock | SpatialTransformer?], then a
                            Downsample (every level but the last)
    middle_block            ResBlock | SpatialTransformer | ResBlock
    output_blocks           per level, deepest first: (num_res_blocks + 1) x
                            [ResBlock on cat(h, skip) | SpatialTransformer? | Upsample (last, not level 0)]
    time_embed, out         MLP on the timestep embedding; GroupNorm, SiLU, conv 3x3

Level i works at downsample factor ds = 2**i (the original's `attention_resolutions` are such ds).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .footprint import attention_bytes, conv_bytes, feed_forward_bytes
from .norm import group_norm


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of float timesteps t [B] -> [B, dim] (dim even), SD/openaimodel form.

    With half = dim / 2 and f_i = exp(-ln(max_period) * i / half) for i in [0, half):
        emb(t) = [cos(t f_0), ..., cos(t f_{half-1}), sin(t f_0), ..., sin(t f_{half-1})]
    (cos first; DDPM's own variant is [sin, cos] with i / (half - 1)). Computed in float32.
    """
    half = dim // 2
    # this order of operations rounds like the original, which matters at t ~ 1000
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """out = skip(x) + out_layers(in_layers(x) + W emb): two 3x3 convs with the timestep added between."""

    def __init__(self, in_channels, out_channels, emb_channels):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(),
            nn.Identity(),  # index 2 is the original's dropout (0 for SD); kept so the conv stays at .3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with Q from x and K, V from `context` (x itself for self-attention)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """a * GELU(g) with [a, g] = proj(x) (Shazeer 2020); exact erf GELU."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # index 1 is the original's dropout; kept so the output Linear stays at net.2
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU MLP."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the h*w pixels of a feature map, conditioned on `context` (LDM section 3.3).

    x + proj_out(blocks(proj_in(norm(x)))) with the map flattened to tokens [B, h*w, C]. proj_in/out
    are 1x1 convs (SD1) or Linear layers applied to the tokens (SD2, `use_linear`).
    """

    def __init__(self, channels, heads, depth, context_dim, use_linear):
        super().__init__()
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if use_linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, c, h, w)
        if not self.use_linear:
            tokens = self.proj_out(tokens)
        return x + tokens


class Downsample(nn.Module):
    """Halves h and w: conv 3x3, stride 2, padding 1."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (twice the input, or the odd size of the matching skip), then conv 3x3."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers run in order, each given what it uses."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class UNetConfig:
    """Hyperparameters of UNetModel (SD1.5: 4, 4, 320, (1, 2, 4, 4), 2, (0, 1, 2), 1, 768, num_heads=8).

    attention_levels are level indices i (downsample factor 2**i) whose blocks have a
    SpatialTransformer; the middle block always has one. Heads: set exactly one of num_heads (the
    same count at every level, SD1) or num_head_channels (width per head, SD2: 64).
    """
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple
    num_res_blocks: int
    attention_levels: tuple
    transformer_depth: int
    context_dim: int
    num_heads: int | None = None
    num_head_channels: int | None = None
    use_linear_in_transformer: bool = False

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and num_head_channels")

    def heads(self, channels):
        """Number of attention heads in a transformer of `channels` channels."""
        width = self.num_head_channels or channels // self.num_heads
        if width == 0 or channels % width:
            raise ValueError(f"UNetConfig: {channels} channels do not split into "
                             + (f"{self.num_heads} heads" if self.num_heads else f"heads of width {width}"))
        return channels // width

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)  # __post_init__ turns JSON lists back into tuples


class UNetModel(nn.Module):
    """eps_theta(x, t, context): x [B, in, H, W], t float [B] (fractional allowed), context [B, L, context_dim].

    Inputs must already be in the module's dtype (t may stay float32). Returns [B, out_channels, H, W].
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels

        def transformer(ch):
            return SpatialTransformer(ch, cfg.heads(ch), cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels, ch = [mc], mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = Block([ResBlock(ch, ch, emb_dim), transformer(ch), ResBlock(ch, ch, emb_dim)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * mc, emb_dim)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:  # each pops the skip pushed by its mirror image (LIFO)
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[2:] if skips else None)
        return self.out(h)


def infer_unet_config(shapes, num_heads=None, num_head_channels=None):
    """UNetConfig from a state dict's {key: shape} (keys without `model.diffusion_model.`).

    Walks input_blocks as SD_REFERENCE.md 3.2/3.3 describe: a block with `0.op` closes a level, a
    block with `0.in_layers` is a ResBlock whose output width gives the level's channel_mult, and a
    `1.proj_in` beside it marks an attention level. Context width, depth and projection kind come
    from the middle transformer. Heads are not in the shapes: without arguments the family default
    applies (context 768 with conv projections, i.e. SD1: num_heads 8; otherwise head width 64).
    checkpoint.check_layout then checks every key and shape against the model this config builds.
    """
    shapes = {k: tuple(s) for k, s in shapes.items()}

    def need(key):
        if key not in shapes:
            raise ValueError(f"UNet state dict: missing key {key!r}")
        return shapes[key]

    conv_in = need("input_blocks.0.0.weight")
    if len(conv_in) != 4:
        raise ValueError(f"UNet state dict: 'input_blocks.0.0.weight' has shape {list(conv_in)}, expected a 3x3 conv")
    model_channels, in_channels = conv_in[:2]

    n_blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks."))
    levels, run = [], []  # per level: the indices of input_blocks that hold a ResBlock
    for n in range(1, n_blocks):
        if f"input_blocks.{n}.0.op.weight" in shapes:
            levels.append(run)
            run = []
        elif f"input_blocks.{n}.0.in_layers.0.weight" in shapes:
            run.append(n)
        else:
            raise ValueError(f"UNet state dict: input_blocks.{n} is neither a ResBlock "
                             f"('input_blocks.{n}.0.in_layers.0.weight') nor a Downsample ('input_blocks.{n}.0.op.weight')")
    levels.append(run)
    if not all(levels):
        raise ValueError("UNet state dict: a level of input_blocks has no ResBlock before its Downsample")

    channel_mult = tuple(need(f"input_blocks.{run[0]}.0.out_layers.3.weight")[0] // model_channels for run in levels)
    attention_levels = tuple(i for i, run in enumerate(levels) if f"input_blocks.{run[0]}.1.proj_in.weight" in shapes)
    use_linear = len(need("middle_block.1.proj_in.weight")) == 2
    context_dim = need("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    depth = len({k.split(".")[3] for k in shapes if k.startswith("middle_block.1.transformer_blocks.")})

    if num_heads is None and num_head_channels is None:
        if context_dim == 768 and not use_linear:
            num_heads = 8
        else:
            num_head_channels = 64
    return UNetConfig(in_channels, need("out.2.weight")[0], model_channels, channel_mult, len(levels[0]),
                      attention_levels, depth, context_dim, num_heads, num_head_channels, use_linear)


def activation_peak(config, b, h, w, s, context_tokens):
    """Peak bytes of one forward pass in inference mode (core/memory.py): the skip connections of every
    level (all alive at the middle block) plus the largest working set."""
    skips, phases = 0, []
    levels = len(config.channel_mult)
    for level, mult in enumerate(config.channel_mult):
        c = config.model_channels * mult
        positions = math.ceil(h / 2**level) * math.ceil(w / 2**level)
        skips += (config.num_res_blocks + 1) * b * c * positions * s
        phases.append(conv_bytes(b, 2 * c, positions, s))  # an output block's input: its skip concatenated
        if level in config.attention_levels or level == levels - 1:
            heads = config.heads(c)
            phases += [attention_bytes(b, heads, positions, positions, c, s),
                       attention_bytes(b, heads, positions, context_tokens, c, s),
                       feed_forward_bytes(b, positions, c, 8 * c, s)]  # GEGLU: a 2 x 4c projection
    return skips + max(phases)
