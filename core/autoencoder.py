"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3 and appendix G).

An encoder E maps an image x in [-1, 1] of size H x W to the moments of a diagonal Gaussian over a latent
of size H/f x W/f; a decoder D maps a latent back to an image. A small KL penalty towards N(0, I) keeps the
latent space regular. Parameter names follow the original CompVis layout (`first_stage_model.*` in an SD1.x
checkpoint, prefix stripped), so SD weights load without a rename table:

    encoder.conv_in, encoder.down.i.{block.j, attn.j, downsample.conv}, encoder.mid.{block_1, attn_1, block_2},
    encoder.norm_out, encoder.conv_out, quant_conv, post_quant_conv,
    decoder.conv_in, decoder.mid.*, decoder.up.i.{block.j, attn.j, upsample.conv}, decoder.norm_out, decoder.conv_out

Latents here are *unscaled*: the caller multiplies by `config.scale_factor` before diffusion and divides after.

`IdentityAutoencoder` is the pixel-space special case (f = 1, z = x), so pixel diffusion runs through
the same nodes, trainer and samplers.

Large images are encoded and decoded in overlapping tiles (`encode_tiled`, `decode_tiled`) of TILE
latent pixels a side, above TILE_ABOVE, so their memory is that of one tile (core/memory.py).

Why this file is long: the autoencoder's modules, its SD-compatible config inference and the tiling
that bounds its memory belong to one model, whose names the checkpoint layout fixes.
"""
import itertools
import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .norm import group_norm

TILE, TILE_OVERLAP = 64, 16  # latent pixels: a tile's side, and how far neighbouring tiles overlap
TILE_ABOVE = 96  # latents (and images of f times as many pixels) larger than this a side are tiled


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of the autoencoder; the defaults are SD1.x's (v1-inference.yaml `first_stage_config`)."""
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                      # channels of the first level
    ch_mult: tuple = (1, 2, 4, 4)      # level i has ch * ch_mult[i] channels
    num_res_blocks: int = 2            # ResnetBlocks per encoder level (the decoder has one more)
    attn_levels: tuple = ()            # levels with self-attention after each ResnetBlock
    z_channels: int = 4                # channels of the encoder/decoder latent
    embed_dim: int = 4                 # channels of the posterior (after quant_conv)
    double_z: bool = True              # the encoder predicts mean and log-variance
    scale_factor: float = 0.18215      # latent scaling for diffusion; not stored in the weights

    @property
    def f(self):
        """Downsampling factor: one stride-2 downsample between consecutive levels."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class IdentityConfig:
    """Pixel space as a special case of latent space: z = x, f = 1, no weights (DDPM's own setting:
    images in [-1, 1], Ho et al. 2020 section 4). The fields mirror AutoencoderConfig's."""
    channels: int = 3
    kind: str = "identity"

    f = 1
    scale_factor = 1.0

    @property
    def embed_dim(self):
        return self.channels

    def to_dict(self):
        return asdict(self)


def autoencoder_config_from_dict(d):
    """AutoencoderConfig or IdentityConfig from a checkpoint's metadata."""
    if d.get("kind") == "identity":
        return IdentityConfig(**d)
    return AutoencoderConfig.from_dict(d)


def placement(module):
    """(device, dtype) of a module's first parameter or buffer."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()))
    return tensor.device, tensor.dtype


def infer_autoencoder_config(shapes, scale_factor=0.18215):
    """Read an AutoencoderConfig from parameter shapes (key without `first_stage_model.` -> shape).

    Raises ValueError naming the key that is missing or has an unexpected shape.
    """
    def shape(key):
        if key not in shapes:
            raise ValueError(f"autoencoder weights lack {key!r}")
        return tuple(shapes[key])

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"autoencoder weights have encoder.down levels {levels}, expected 0, 1, ... (at least one)")
    ch_mult = []
    for i in levels:
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if shape(key)[0] % ch:
            raise ValueError(f"{key} has {shape(key)[0]} output channels, not a multiple of ch = {ch}")
        ch_mult.append(shape(key)[0] // ch)
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    z_channels = shape("decoder.conv_in.weight")[1]
    moments = shape("encoder.conv_out.weight")[0]
    if moments not in (z_channels, 2 * z_channels):
        raise ValueError(f"encoder.conv_out.weight has {moments} output channels; z_channels is {z_channels}")
    embed_dim = shape("post_quant_conv.weight")[1]
    if shape("quant_conv.weight")[:2] != (2 * embed_dim, moments):
        raise ValueError(f"quant_conv.weight has shape {shape('quant_conv.weight')}, "
                         f"expected ({2 * embed_dim}, {moments}, 1, 1)")
    return AutoencoderConfig(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_levels=tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in shapes),
        z_channels=z_channels,
        embed_dim=embed_dim,
        double_z=moments == 2 * z_channels,
        scale_factor=scale_factor,
    )


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, added to the input (1x1 nin_shortcut if channels change)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = group_norm(in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))  # [B, H*W, C]
        y = attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve H and W: pad one pixel right and bottom, then a 3x3 stride-2 convolution with no padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResnetBlocks (`block.j`), each followed by self-attention (`attn.j`) at attention levels.

    The encoder gives each level a `downsample` and the decoder an `upsample` (nn.Identity, which has no
    weights, where a level has none), applied after the blocks.
    """

    def __init__(self, in_ch, out_ch, num_blocks, has_attn):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(num_blocks if has_attn else 0))

    def forward(self, x):
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[j](x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, global self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image [B, in, H, W] -> [B, 2 * z_channels, H/f, W/f] (mean and log-variance, before quant_conv)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            level = Level(cfg.ch if i == 0 else widths[i - 1], width, cfg.num_res_blocks, i in cfg.attn_levels)
            level.downsample = Downsample(width) if i < last else nn.Identity()
            self.down.append(level)
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(level(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out, f*h, f*w]. Runs up.{last} -> up.0, with no skip connections."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # level i receives the output of level i+1 (the mid block's for the last level)
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            level = Level(widths[min(i + 1, last)], width, cfg.num_res_blocks + 1, i in cfg.attn_levels)
            level.upsample = Upsample(width) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = group_norm(widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), from moments [B, 2 * embed_dim, h, w]."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.var = self.logvar.exp()
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator=None):
        """z = mean + std * eps. eps is drawn on the CPU, so a seed gives the same latent on every device."""
        eps = torch.randn(self.mean.shape, generator=generator)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over channels and positions: [B]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """x -> E(x) -> quant_conv -> posterior over z; z -> post_quant_conv -> D -> x. The SD1.x first stage."""

    def __init__(self, config):
        super().__init__()
        if not config.double_z:
            raise ValueError("the KL autoencoder needs double_z: its encoder predicts a mean and a log-variance")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x):
        """Image [B, 3, H, W] in [-1, 1], H and W multiples of f -> posterior over unscaled latents."""
        f = self.config.f
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} (HxW) is not a multiple of the "
                             f"autoencoder's downsampling factor f = {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Unscaled latent [B, embed_dim, h, w] -> image [B, 3, f*h, f*w], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def encode_tiled(self, x, tile=TILE, overlap=TILE_OVERLAP, progress=None):
        """encode() in overlapping tiles of at most tile x tile latent pixels (f times as many image
        pixels), to bound memory on large images; the posterior's moments are cross-faded across each
        overlap with the weights decode_tiled uses (f = 1: they blend latent pixels). One tile is
        exactly encode(); otherwise close, for the reasons decode_tiled gives. progress(done, total)
        is called with 0 before the first tile and after each one."""
        if not 0 < overlap < tile:
            raise ValueError(f"encode_tiled needs 0 < overlap < tile, got overlap {overlap} and tile {tile}")
        f = self.config.f
        if x.shape[-2] % f or x.shape[-1] % f:
            return self.encode(x)  # its own error names the size
        b, _, height, width = x.shape
        moments = x.new_zeros(b, 2 * self.config.embed_dim, height // f, width // f)
        for y0, wy, x0, wx in _tiles(height // f, width // f, tile, overlap, 1, progress):
            part = self.quant_conv(self.encoder(x[:, :, f * y0:f * (y0 + len(wy)), f * x0:f * (x0 + len(wx))]))
            moments[:, :, y0:y0 + len(wy), x0:x0 + len(wx)] += part * (wy[:, None] * wx[None, :]).to(part.dtype)
        return DiagonalGaussian(moments)

    def decode_tiled(self, z, tile=TILE, overlap=TILE_OVERLAP, progress=None):
        """decode() in overlapping latent tiles of at most tile x tile, to bound memory on large images.

        Neighbouring tiles overlap by at least `overlap` latent pixels, and a linear cross-fade of
        overlap * f image pixels across the middle of each overlap hides the seams. A latent that fits
        in one tile is decoded exactly as decode() does. Otherwise the result is close but not equal: pixels
        near a tile's border see zero padding, and GroupNorm statistics and the mid block's attention see
        one tile instead of the whole latent. progress(done, total) as for encode_tiled.
        """
        if not 0 < overlap < tile:
            raise ValueError(f"decode_tiled needs 0 < overlap < tile, got overlap {overlap} and tile {tile}")
        f = self.config.f
        b, _, h, w = z.shape
        out = z.new_zeros(b, self.config.out_channels, f * h, f * w)
        for y0, wy, x0, wx in _tiles(h, w, tile, overlap, f, progress):
            x = self.decode(z[:, :, y0:y0 + len(wy) // f, x0:x0 + len(wx) // f])
            weight = (wy[:, None] * wx[None, :]).to(x.device, x.dtype)
            out[:, :, f * y0:f * y0 + len(wy), f * x0:f * x0 + len(wx)] += x * weight
        return out


def _tiles(h, w, tile, overlap, f, progress=None):
    """(y0, weights along y, x0, weights along x) of each tile, row by row (blend_weights), with
    progress(done, total) called before the first and after each one."""
    rows, columns = blend_weights(h, tile, overlap, f), blend_weights(w, tile, overlap, f)
    total = len(rows) * len(columns)
    for done, ((y0, wy), (x0, wx)) in enumerate((r, c) for r in rows for c in columns):
        if progress is not None:
            progress(done, total)
        yield y0, wy, x0, wx
    if progress is not None:
        progress(total, total)


def blend_weights(size, tile, overlap, f):
    """Tiles along one axis of `size` latent pixels: [(start, weights over the tile's image pixels)].

    Tiles are min(tile, size) long, evenly spread, and neighbours overlap by >= overlap latent pixels.
    Seam i sits at the middle of the overlap of tiles i-1 and i, and H_i ramps linearly from 0 to 1
    over overlap * f image pixels across it; tile i gets H_i - H_{i+1} (with H_0 = 1, H_n = 0). The
    weights telescope to 1 at every pixel, and each one is zero outside its own tile, because each
    ramp lies inside its overlap.
    """
    t = min(tile, size)
    n = 1 if size <= tile else math.ceil((size - overlap) / (tile - overlap))
    starts = [i * (size - t) // max(n - 1, 1) for i in range(n)]
    seams = [f * (start + prev + t) / 2 for prev, start in zip(starts, starts[1:])]
    centres = torch.arange(f * size, dtype=torch.float64) + 0.5
    ramps = [((centres - c) / (f * overlap) + 0.5).clamp(0, 1) for c in seams]
    steps = [torch.ones_like(centres)] + ramps + [torch.zeros_like(centres)]
    return [(s, (steps[i] - steps[i + 1])[f * s:f * (s + t)]) for i, s in enumerate(starts)]


class PointMass:
    """The identity autoencoder's posterior: all mass on x (mean x, std 0)."""

    def __init__(self, x):
        self.mean, self.std = x, torch.zeros_like(x)

    def sample(self, generator=None):
        return self.mean

    def mode(self):
        return self.mean


class IdentityAutoencoder(nn.Module):
    """encode(x) = decode(x) = x: what the nodes, the trainer and the likelihood see as pixel space."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or IdentityConfig()
        # no weights; an empty buffer so the module has a device and dtype that .to() moves
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def encode(self, x):
        if x.shape[1] != self.config.channels:
            raise ValueError(f"image has {x.shape[1]} channels; this pixel-space model takes {self.config.channels}")
        return PointMass(x)

    def decode(self, z):
        return z

    def encode_tiled(self, x, tile=TILE, overlap=TILE_OVERLAP, progress=None):
        return self.encode(x)

    def decode_tiled(self, z, tile=TILE, overlap=TILE_OVERLAP, progress=None):
        return z
