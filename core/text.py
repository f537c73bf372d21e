"""CLIP text side of Stable Diffusion 1.x: the BPE tokenizer, ComfyUI-style prompt weighting, and
the CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", section 2.4), with no dependency on transformers, regex or ftfy.

Tokenizer: byte-level BPE (Sennrich et al. 2016) over CLIP's vocabulary
`bpe_simple_vocab_16e6.txt.gz` (OpenAI, MIT; see bpe_simple_vocab_16e6.LICENSE). Text is
normalised the way transformers 5's CLIPTokenizer does it (NFC, lowercase; no ftfy, no HTML
unescaping), so ids match that tokenizer, which is what ComfyUI and diffusers use.

Text model: parameter names follow the SD1 checkpoint under `cond_stage_model.transformer.`
(the HF `CLIPTextModel` layout), so an SD1.x state dict loads without renaming.

Why this file is long: it is the whole text side of SD1.x, tokenizer and model, which share their
constants (BOS/EOS ids, the 77-token context) and are checked together against transformers.
"""
import dataclasses
import functools
import gzip
import math
import re
import unicodedata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .errors import InputError

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77  # BOS + 75 prompt tokens + EOS: the sequence SD1's text encoder always sees
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses: lines 1..48894 of the file (line 0 is a header)

# Unicode White_Space, which is what `\s` means to the `regex` module and to tokenizers' Oniguruma.
# Python's `\s` also matches the separators U+001C..U+001F, which CLIP treats as punctuation.
_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# CLIP's pre-tokenising pattern, `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, in
# stdlib `re`. `[^\W\d_]` is \p{L} plus the non-decimal numerals (categories No, Nl: "½", "Ⅻ"),
# which `_pieces` splits back out as numbers; `\d` is exactly Nd. The rest is neither space, letter
# nor number (`_` is in `\w`, so it is added back).
_PIECE = re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                    rf"|[^\W\d_]+|\d|(?:[^{_SPACE}\w]|_)+")
_WORD = re.compile(f"[^{_SPACE}]+")
_SPECIAL = re.compile(f"({re.escape(BOS)}|{re.escape(EOS)})")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
    """The 256 byte values as printable characters, so that BPE can work on strings.

    Returns {byte: char} in vocabulary order: the printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ`
    stand for themselves and come first; the other 68 (control characters, space, soft hyphen...)
    follow, in increasing byte order, as chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.lru_cache(maxsize=None)
def _load_vocab(path):
    """Read the merges file once; returns (token -> id, merge pair -> rank).

    Ids: the 256 byte characters (`!` = 0), the same with the end-of-word mark `</w>` (256..511),
    one token per merge in file order (512..49405), then BOS and EOS: 49408 in all.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}


def _pieces(text):
    """Pre-tokenise normalised text into the words BPE works on."""
    for piece in _PIECE.findall(text):
        if piece in (BOS, EOS):
            # Only reached when the text had them in another case ("<|ENDOFTEXT|>"): transformers
            # keeps this one piece, then its byte-level step (GPT-2's pattern) splits it in three.
            yield from ("<|", piece[2:-2], "|>")
        else:
            yield from _split_numerals(piece)


def _split_numerals(piece):
    """A number is one character per piece in CLIP: cut non-decimal numerals out of letter runs."""
    run = ""
    for c in piece:
        if unicodedata.category(c) in ("No", "Nl"):
            if run:
                yield run
            yield c
            run = ""
        else:
            run += c
    if run:
        yield run


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (ids as in transformers' CLIPTokenizer).

    Construction is free: the vocabulary file is read on first use and shared by every instance
    that names the same file. `encode` returns ids without BOS/EOS.
    """

    def __init__(self, vocab_path=VOCAB_PATH):
        self.vocab_path = Path(vocab_path)
        self._cache = {}  # piece -> ids, one entry per distinct piece seen

    @property
    def vocab(self):
        """token -> id (49408 entries)."""
        return _load_vocab(self.vocab_path)[0]

    def encode(self, text):
        ids = []
        # BOS/EOS written in the text are the special tokens, as in transformers (case-sensitive,
        # matched before normalisation).
        for i, part in enumerate(_SPECIAL.split(text)):
            if i % 2:
                ids.append(BOS_ID if part == BOS else EOS_ID)
            else:
                for piece in _pieces(_normalise(part)):
                    ids.extend(self._bpe(piece))
        return ids

    def _bpe(self, piece):
        """Ids of one pre-tokenised piece: merge the lowest-ranked adjacent pair until none is ranked."""
        if piece not in self._cache:
            vocab, ranks = _load_vocab(self.vocab_path)
            chars = bytes_to_unicode()
            word = [chars[b] for b in piece.encode("utf-8")]
            word[-1] += "</w>"
            while len(word) > 1:
                pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
                if pair not in ranks:
                    break
                word = _merge(word, pair)
            self._cache[piece] = [vocab[t] for t in word]
        return self._cache[piece]


def _merge(word, pair):
    """Replace every non-overlapping occurrence of `pair`, left to right, by its concatenation."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _normalise(text):
    """NFC, then lowercase character by character.

    Per character, as tokenizers' Lowercase does: str.lower() of a whole string would turn a
    word-final capital sigma into "ς" where transformers gives "σ". Whitespace needs no collapsing:
    it only separates pieces.
    """
    return "".join(map(str.lower, unicodedata.normalize("NFC", text)))


# ---------------------------------------------------------------------------------------------
# ComfyUI prompt syntax: "(words)" multiplies the weight by 1.1 (nesting multiplies),
# "(words:1.3)" sets it, "\(" and "\)" are literal parentheses.

_OPEN, _CLOSE = object(), object()  # parentheses that group, as opposed to literal ones
EMPHASIS = 1.1
MAX_WORD_TOKENS = 8  # a word this long may be split across chunks; a shorter one moves whole
MAX_WEIGHT = 100.0  # |weight| above this pushes the encoding to overflow: refused, naming the weight
MAX_NESTING = 100
MAX_PROMPT_CHARACTERS = 100_000  # about 1,300 chunks of 77 tokens


def parse_weights(text):
    """Split a prompt into [(segment, weight)] in order, by ComfyUI's emphasis syntax.

    A parenthesis without a partner is literal text, and so is a weight that is not a finite
    number: "(a:b)" is "a:b" at 1.1. ComfyUI itself treats unbalanced input less regularly.
    InputError naming `text` for a prompt over MAX_PROMPT_CHARACTERS, groups nested deeper than
    MAX_NESTING, or a weight beyond +-MAX_WEIGHT.
    """
    if len(text) > MAX_PROMPT_CHARACTERS:
        raise InputError("text", f"{len(text):,} characters; at most {MAX_PROMPT_CHARACTERS:,}")
    atoms = _atoms(text)
    partner, stack = {}, []
    for i, a in enumerate(atoms):
        if a is _OPEN:
            if len(stack) == MAX_NESTING:
                raise InputError("text", f"parentheses nested deeper than {MAX_NESTING}")
            stack.append(i)
        elif a is _CLOSE:
            if stack:
                partner[stack.pop()] = i
            else:
                atoms[i] = ")"
    for i in stack:
        atoms[i] = "("
    return [(s, w) for s, w in _weigh(atoms, partner, 0, len(atoms), 1.0) if s]


def _atoms(text):
    """Characters, with grouping parentheses as _OPEN/_CLOSE and escaped ones as plain text."""
    atoms, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in ("(", ")"):
            atoms.append(text[i + 1])
            i += 2
            continue
        atoms.append({"(": _OPEN, ")": _CLOSE}.get(text[i], text[i]))
        i += 1
    return atoms


def _weigh(atoms, partner, lo, hi, weight):
    """Weighted segments of atoms[lo:hi], which hold only balanced groups."""
    out, text = [], ""
    i = lo
    while i < hi:
        if atoms[i] is _OPEN:
            out.append((text, weight))
            text = ""
            end = partner[i]
            inner_end, inner_weight = _explicit_weight(atoms, i + 1, end)
            if inner_weight is None:
                inner_weight = weight * EMPHASIS
            if abs(inner_weight) > MAX_WEIGHT:
                group = "".join(a if isinstance(a, str) else "()"[a is _CLOSE] for a in atoms[i:end + 1])
                raise InputError("text", f"the weight {inner_weight:g} of {group[:60]!r} is beyond "
                                         f"+-{MAX_WEIGHT:g}")
            out += _weigh(atoms, partner, i + 1, inner_end, inner_weight)
            i = end + 1
        else:
            text += atoms[i]
            i += 1
    out.append((text, weight))
    return out


def _explicit_weight(atoms, lo, hi):
    """For a group atoms[lo:hi] ending in ":<number>", (index of that colon, number); else (hi, None).

    As in ComfyUI, the last colon counts, and not when it is the group's first character.
    """
    colon = next((j for j in range(hi - 1, lo, -1) if atoms[j] == ":"), None)
    if colon is None or any(not isinstance(a, str) for a in atoms[colon + 1:hi]):
        return hi, None
    try:
        weight = float("".join(atoms[colon + 1:hi]))
    except ValueError:
        return hi, None
    return (colon, weight) if math.isfinite(weight) else (hi, None)


def tokenize_weighted(tokenizer, text, pad_id=EOS_ID):
    """Prompt -> (ids [k, 77] long, weights [k, 77] float), ComfyUI's way.

    Each weighted segment is split into words on whitespace and each word is tokenised on its
    own. The tokens are packed into chunks of at most 75 between BOS and EOS, padded with
    `pad_id` (SD1 pads with EOS; OpenCLIP/SD2 with 0). A word of fewer than MAX_WORD_TOKENS
    tokens that would straddle a chunk boundary starts the next chunk instead; longer words are
    split. BOS, EOS and padding have weight 1. The empty prompt is one chunk [BOS, EOS, pad...].
    """
    words = [(tokenizer.encode(word), weight)
             for segment, weight in parse_weights(text) for word in _WORD.findall(segment)]
    room = CONTEXT_LENGTH - 2
    chunks, chunk = [], []
    for ids, weight in words:
        tokens = [(t, weight) for t in ids]
        if len(chunk) + len(tokens) > room and len(tokens) < MAX_WORD_TOKENS:
            chunks.append(chunk)
            chunk = []
        while len(chunk) + len(tokens) > room:
            cut = room - len(chunk)
            chunks.append(chunk + tokens[:cut])
            chunk, tokens = [], tokens[cut:]
        chunk += tokens
    chunks.append(chunk)
    ids = [[BOS_ID] + [t for t, _ in c] + [EOS_ID] + [pad_id] * (room - len(c)) for c in chunks]
    weights = [[1.0] + [w for _, w in c] + [1.0] * (room + 1 - len(c)) for c in chunks]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The CLIP text transformer: pre-LN, causal self-attention, learned absolute positions.

def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU (SD1's text encoder was trained with it)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # gelu: OpenCLIP (SD2)


@dataclasses.dataclass
class CLIPTextConfig:
    """Defaults are SD1.x's text encoder, OpenAI CLIP ViT-L/14's text tower."""
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = CONTEXT_LENGTH
    activation: str = "quick_gelu"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def infer_text_config(shapes, heads=None):
    """CLIPTextConfig from {key: shape} in the HF layout (keys start with "text_model.").

    The head count is not stored in the weights: it defaults to width // 64 (CLIP's head width;
    at least 1). The activation cannot be read either; this layout is OpenAI CLIP's: quick_gelu.
    A missing or misshapen key raises ValueError naming it.
    """
    def shape(key, rank):
        if key not in shapes:
            raise ValueError(f"text encoder weights lack {key!r}")
        s = tuple(shapes[key])
        if len(s) != rank:
            raise ValueError(f"{key!r} has shape {s}, expected {rank} dimensions")
        return s

    vocab_size, width = shape("text_model.embeddings.token_embedding.weight", 2)
    max_positions, position_width = shape("text_model.embeddings.position_embedding.weight", 2)
    if position_width != width:
        raise ValueError(f"'text_model.embeddings.position_embedding.weight' has width {position_width}, "
                         f"the token embedding {width}")
    prefix = "text_model.encoder.layers."
    numbers = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    layers = 1 + max((int(n) for n in numbers if n.isdigit()), default=0)
    for n in range(layers):  # every layer up to the last must be there, and at least one
        shape(f"{prefix}{n}.mlp.fc1.weight", 2)
    shape("text_model.final_layer_norm.weight", 1)
    return CLIPTextConfig(vocab_size=vocab_size, width=width, layers=layers,
                          heads=max(1, width // 64) if heads is None else heads,
                          mlp_width=shapes[f"{prefix}0.mlp.fc1.weight"][0], max_positions=max_positions)


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.max_positions, c.width)

    def forward(self, ids):
        # Positions are always 0..n-1; a checkpoint's `position_ids` buffer is ignored.
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.width, c.width) for _ in range(4))

    def forward(self, x):
        # Causal: each token sees only itself and the tokens before it.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_width)
        self.fc2 = nn.Linear(c.mlp_width, c.width)
        self.activation = ACTIVATIONS[c.activation]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width, eps=1e-5)
        self.self_attn = SelfAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=1e-5)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))


class TextTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.width, eps=1e-5)

    def forward(self, ids, layer=-1):
        n = len(self.encoder.layers)
        if not -n <= layer < 0:
            raise ValueError(f"layer must be in -{n}..-1, got {layer}")
        x = self.embeddings(ids)
        for block in self.encoder.layers[:n + layer + 1]:
            x = block(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """CLIP's text encoder, named as SD1 checkpoints store it under `cond_stage_model.transformer.`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)

    def forward(self, ids, layer=-1):
        """ids [B, n<=max_positions] -> hidden states [B, n, width] after `layer` (-1: the last,
        -2: "CLIP skip 2"), always followed by final_layer_norm, as SD and ComfyUI do."""
        return self.text_model(ids, layer)


def encode_prompt(tokenizer, model, text, layer=-1, pad_id=EOS_ID):
    """Prompt -> UNet context [1, 77*k, width]: each 77-token chunk encoded on its own, then
    concatenated along the tokens.

    Weights as ComfyUI applies them: with z_empty the encoding of the empty prompt, a token of
    weight w != 1 becomes z_empty + w * (z - z_empty), a push away from (or towards) "nothing".
    """
    ids, weights = tokenize_weighted(tokenizer, text, pad_id)
    device = next(model.parameters()).device
    z = model(ids.to(device), layer)
    if (weights != 1).any():
        empty_ids, _ = tokenize_weighted(tokenizer, "", pad_id)
        z_empty = model(empty_ids.to(device), layer)
        w = weights.to(z)[..., None]
        z = torch.where(w != 1, (z - z_empty) * w + z_empty, z)
    return z.reshape(1, -1, z.shape[-1])
