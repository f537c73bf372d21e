"""Single-file checkpoints: read safetensors, split the parts, infer their configs, load, save.

An SD1.x file holds three parts under fixed prefixes (SD_REFERENCE.md 1.1):
    model.diffusion_model.          -> UNetModel
    first_stage_model.              -> AutoencoderKL
    cond_stage_model.transformer.   -> CLIPTextModel (very old files lack `text_model.`)
Our own files use the same layout and add, in the safetensors metadata under "ldm_nodes", the JSON
configs, the training schedule, the prediction type and the tokenizer's identity. Everything that
shapes cannot tell comes from there, else from the family's defaults (SD1.x: 8 heads, eps,
scaled_linear 0.00085..0.012).

`read_header(path)` is the one header validator (the loader, `nll`, `train --init` and the
GET /ldm/schedule route all use it): from the header alone, never the weights, it checks the file's
structure (each tensor's dtype, shape and data offsets, which must tile the data exactly), every
metadata field against its type and bound (timesteps, channels, widths, depths, vocabulary: a
number read from a file never sizes an allocation unchecked), and the parts' layout against the
modules their configs build on the meta device. It returns a `Header` holding what it learnt, and
the loader reads the weights into those same meta modules, so a file's header is parsed once per
load. Any refusal is a CheckpointError (an InputError) naming the file and the field or tensor.

Only safetensors is read. Pickled files (.ckpt, .pt, .bin) are refused without being opened by
pickle: unpickling runs arbitrary code.

Why this file is long: the header validator's rules (structure, metadata bounds, layout) and the
loader that relies on them are one contract; split, each half would restate the other's assumptions.
"""
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .autoencoder import (AutoencoderKL, IdentityAutoencoder, IdentityConfig,
                          autoencoder_config_from_dict, infer_autoencoder_config)
from .denoiser import PREDICTIONS
from .errors import InputError
from .families import FAMILIES, detect, family_of
from .meta import empty_modules
from .schedule import BETA_SCHEDULES, TrainingSchedule
from .text import CLIPTextConfig, CLIPTextModel, infer_text_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
PREFIXES = {"denoiser": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
METADATA_KEY = "ldm_nodes"
FORMAT_VERSION = 1
TOKENIZER_ID = "openai-clip-bpe-16e6"
# Where a file's "parts_from" names resolve: {prefix: folder}. The layer that knows where its model files
# live says so with `provide_parts` (nodes/model_paths: "builtin/" -> the pack's models/); core knows no folder.
PART_SOURCES = {}

PARTS = ("denoiser", "vae", "text")

# Stable Diffusion 1.x: what its files cannot say about themselves.
SD1_SCHEDULE = {"beta_schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
SD1_PREDICTION = "eps"

# Keys an SD file may carry that no module consumes (SD_REFERENCE.md 1.1).
_SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "model_ema.decay", "model_ema.num_updates"}
_HEADER_LIMIT = 100 * 1024 * 1024

# safetensors dtypes -> bytes per element; the parts' weights must be one of the floating ones.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOATING = {"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"}
_MAX_DIMS = 8
_MAX_TENSORS = 65536  # SDXL holds about 2,500

# Bounds of the numbers a file's metadata may hold, by field name: (lowest, highest). Channel counts,
# widths and head counts not named here share _WIDTH_LIMIT; counts of repeated blocks are kept small
# because each one is a module built in Python before the layout check can compare it with the file.
_WIDTH_LIMIT = (0, 65536)
_LIMITS = {"num_timesteps": (2, 100_000), "vocab_size": (1, 1_000_000), "max_positions": (1, 8192),
           "num_res_blocks": (0, 32), "transformer_depth": (1, 64), "depth": (1, 256), "layers": (1, 256),
           "patch_size": (1, 64), "base_size": (1, 16384), "frequency_dim": (2, 65536), "format": (1, FORMAT_VERSION),
           "resolution": (1, 16384), "channels": (1, 64)}
_FLOAT_LIMITS = {"scale_factor": (0, 1e4), "beta_start": (0, 1), "beta_end": (0, 1), "mlp_ratio": (0, 64),
                 "interpolation_scale": (0, 1e4)}  # exclusive bounds
_TUPLE_LIMITS = {"channel_mult": (1, 64), "ch_mult": (1, 64), "attention_levels": (0, 15), "attn_levels": (0, 15)}
_MAX_LEVELS = 8
_STRING_LIMIT = 1024


class CheckpointError(InputError):
    """A model file that cannot be used: the file is the input named, the reason says which field or tensor."""

    def __init__(self, path, problem):
        super().__init__(os.fspath(path), problem)


@dataclass
class Checkpoint:
    """A loaded model: the three parts and what is needed to sample from them."""

    denoiser: torch.nn.Module  # UNetModel or TransformerModel
    vae: torch.nn.Module  # AutoencoderKL or IdentityAutoencoder
    text_encoder: CLIPTextModel
    schedule: TrainingSchedule
    prediction: str
    path: str
    resolution: int = None  # the image size it was trained on, when its training record says


@dataclass
class Part:
    """One part stored in a file: its label in messages, its keys ({name in the module: key in the
    file}) and the module its config builds, on the meta device until the loader fills it."""

    label: str
    keys: dict
    module: torch.nn.Module


@dataclass
class Header:
    """What a file's header says, validated (see `read_header`)."""

    path: str
    tensors: dict  # key -> {"dtype", "shape", "data_offsets"}
    metadata: dict  # our JSON metadata ({} for files that are not ours)
    schedule: TrainingSchedule
    prediction: str
    parts: dict = field(default_factory=dict)  # part -> Part, for the parts the file stores
    sources: dict = field(default_factory=dict)  # part -> Header of the built-in file that provides it


def read_header(path, *, nested=False):
    """The validated header of a model file: a Header, or CheckpointError naming the file and the field.

    Reads only the header, never the weights; refuses pickles before anything else. The built-in
    files named by "parts_from" are read too (one level: `nested` is set for them)."""
    tensors, raw_metadata, data_start = _read_raw(path)
    _check_tensors(path, tensors, data_start, os.path.getsize(path))
    metadata = _our_metadata(path, raw_metadata)
    schedule = _check_metadata(path, metadata)
    header = Header(os.fspath(path), tensors, metadata, schedule, metadata.get("prediction", SD1_PREDICTION))
    shared = metadata.get("parts_from", {})
    if nested and shared:
        raise CheckpointError(path, "provides parts to another file but takes them from elsewhere itself")
    header.parts = _build_parts(header)
    header.sources = {part: read_header(part_source_path(path, name), nested=True) for part, name in shared.items()}
    return header


def _read_raw(path):
    """({key: entry}, safetensors __metadata__, where the data starts), before any check of their content."""
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, a pipe or a device: never opened
        raise CheckpointError(path, "not a regular file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)  # the header length, then the header's opening brace
            _refuse_pickles(path, head, size)
            if len(head) < 8:
                raise CheckpointError(path, "truncated: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head[:8])
            if n > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(path, f"corrupt or truncated safetensors header (length {n}, file {size} bytes)")
            raw = (head[8:] + f.read(max(n - 1, 0)))[:n]
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    header = _json(path, raw, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "__metadata__: must map names to strings")
    if len(header) > _MAX_TENSORS:
        raise CheckpointError(path, f"{len(header)} tensors; at most {_MAX_TENSORS:,} are read")
    return header, metadata, 8 + n


def _json(path, raw, what):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt {what} ({e})") from None
    except (ValueError, RecursionError) as e:  # an integer beyond Python's digit limit; nesting too deep
        raise CheckpointError(path, f"corrupt {what} ({type(e).__name__}: {str(e)[:120]})") from None


def _check_tensors(path, tensors, start, size):
    """Every entry is {dtype, shape, data_offsets} with a known dtype, a size that matches its
    offsets, and offsets that tile the data without gap or overlap, inside the file."""
    spans = sorted((*_check_entry(path, key, entry), key) for key, entry in tensors.items())
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            problem = "overlap the tensor before it" if begin < end else "leave a gap after the tensor before it"
            raise CheckpointError(path, f"tensor {key!r}: data_offsets [{begin}, {stop}] {problem}")
        end = stop
    if start + end > size:
        raise CheckpointError(path, f"truncated: the header describes {start + end} bytes, the file has {size}")
    if start + end < size:
        raise CheckpointError(path, f"{size - start - end} bytes after the last tensor's data; the file is corrupt")


def _check_entry(path, key, entry):
    """(begin, end) of one header entry's data, once its dtype, shape and offsets are valid and agree."""
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"tensor {key!r}: its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise CheckpointError(path, f"tensor {key!r}: unknown dtype {dtype!r:.40}")
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(type(d) is int and 0 <= d < 2**48 for d in shape)):
        raise CheckpointError(path, f"tensor {key!r}: shape must be a list of at most {_MAX_DIMS} sizes, "
                                    f"got {str(shape)[:80]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 2**63 for o in offsets) or offsets[0] > offsets[1]):
        raise CheckpointError(path, f"tensor {key!r}: data_offsets must be [begin, end], got {str(offsets)[:80]}")
    if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
        raise CheckpointError(path, f"tensor {key!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                                    f"bytes, but shape {shape} of {dtype} needs {math.prod(shape) * _ITEMSIZE[dtype]}")
    return offsets[0], offsets[1]


def _refuse_pickles(path, head, size):
    """Refuse by name, or by a pickle (\\x80) or zip (PK) signature where no safetensors header starts:
    a safetensors length can begin with those bytes too (a header of 128 + 256 k bytes starts with \\x80)."""
    safetensors = len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8
    signature = head[:1] == b"\x80" or head[:2] == b"PK"
    if os.fspath(path).lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")) or (signature and not safetensors):
        raise CheckpointError(path, "is a pickled PyTorch file; ldm-nodes reads only .safetensors, because "
                                    "unpickling can run arbitrary code. Convert it once, in an environment you trust: "
                                    "python -c \"import torch, safetensors.torch as s; sd = torch.load('model.ckpt', "
                                    "weights_only=True); sd = sd.get('state_dict', sd); "
                                    "s.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, "
                                    "'model.safetensors')\"")


def _our_metadata(path, raw_metadata):
    if METADATA_KEY not in raw_metadata:
        return {}
    metadata = _json(path, raw_metadata[METADATA_KEY], "ldm_nodes metadata")
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "ldm_nodes metadata: must be a JSON object")
    return metadata


def _check_metadata(path, metadata):
    """The training schedule, once every field of our metadata that is read is checked for type and
    bound; CheckpointError naming the field otherwise."""
    def refuse(name, problem):
        raise CheckpointError(path, f"metadata {name}: {problem}")

    if "format" in metadata:
        _check_number(path, "format", metadata["format"], _LIMITS["format"])
    family = metadata.get("family")
    if family is not None and family not in FAMILIES:
        refuse("family", f"unknown denoiser family {str(family)[:40]!r}; this version reads {', '.join(FAMILIES)}")
    for name in (*FAMILIES, "vae", "text", "schedule", "training", "parts_from"):
        if name in metadata and not isinstance(metadata[name], dict):
            refuse(name, f"must be a JSON object, got {type(metadata[name]).__name__}")
    for name in ("prediction", "tokenizer"):
        if name in metadata and not isinstance(metadata[name], str):
            refuse(name, f"must be a string, got {type(metadata[name]).__name__}")
    if metadata.get("prediction", SD1_PREDICTION) not in PREDICTIONS:
        refuse("prediction", f"unknown {metadata['prediction'][:40]!r}; choose one of: {', '.join(PREDICTIONS)}")
    for part, name in metadata.get("parts_from", {}).items():
        if part not in PARTS or not isinstance(name, str) or len(name) > _STRING_LIMIT:
            refuse(f"parts_from.{str(part)[:40]}", f"must map one of {', '.join(PARTS)} to a builtin/<file> name")
    resolution = metadata.get("training", {}).get("resolution")
    if resolution is not None:
        _check_number(path, "training.resolution", resolution, _LIMITS["resolution"])
    for name in (*FAMILIES, "vae", "text"):
        if name in metadata:
            _check_config_dict(path, name, metadata[name])
    schedule = metadata.get("schedule", SD1_SCHEDULE)
    _check_config_dict(path, "schedule", schedule)
    if schedule.get("beta_schedule", "scaled_linear") not in BETA_SCHEDULES:
        refuse("schedule.beta_schedule", f"unknown {str(schedule['beta_schedule'])[:40]!r}; "
                                         f"choose one of {', '.join(BETA_SCHEDULES)}")
    try:
        return TrainingSchedule.from_config(schedule)
    except (TypeError, ValueError) as e:
        refuse("schedule", str(e))


def _check_config_dict(path, name, config):
    """Each value of a config: a bounded integer, a bounded positive number (the fields of
    _FLOAT_LIMITS), a short string or list of integers, a boolean or null; the field's table decides."""
    for key, value in config.items():
        where = f"{name}.{str(key)[:40]}"
        if key in _LIMITS:
            _check_number(path, where, value, _LIMITS[key])
        elif key in _TUPLE_LIMITS or isinstance(value, (list, tuple)):
            _check_list(path, where, value, _TUPLE_LIMITS.get(key, _WIDTH_LIMIT))
        elif isinstance(value, str):
            if len(value) > _STRING_LIMIT:
                raise CheckpointError(path, f"metadata {where}: a string of {len(value)} characters")
        elif key in _FLOAT_LIMITS and value is not None:
            _check_float(path, where, value, _FLOAT_LIMITS[key])
        elif value is not None and not isinstance(value, bool):
            _check_number(path, where, value, _WIDTH_LIMIT)


def _check_list(path, where, value, bounds):
    """A list of at most _MAX_LEVELS integers, each from lo to hi."""
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(path, f"metadata {where}: must be a list, got {str(value)[:40]}")
    if len(value) > _MAX_LEVELS:
        raise CheckpointError(path, f"metadata {where}: {len(value)} entries; at most {_MAX_LEVELS}")
    for item in value:
        _check_number(path, where, item, bounds)


def _check_float(path, where, value, bounds):
    """A number strictly between lo and hi."""
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise CheckpointError(path, f"metadata {where}: must be a number above {lo} and below {hi:g}, "
                                    f"got {str(value)[:40]}")


def _check_number(path, where, value, bounds):
    """An integer from lo to hi; CheckpointError naming the field otherwise."""
    lo, hi = bounds
    if type(value) is not int:
        raise CheckpointError(path, f"metadata {where}: must be an integer, got {str(value)[:40]}")
    if not lo <= value <= hi:
        raise CheckpointError(path, f"metadata {where}: {value} is outside {lo}..{hi}")


def read_model_metadata(path):
    """Our JSON metadata of a file (empty for files that are not ours); header only, no weights."""
    return read_header(path).metadata


def training_schedule_of(path):
    """The schedule a file's model was trained with, from its header (SD1.x's when it does not say)."""
    return read_header(path).schedule


def split_parts(path, keys, wanted=PARTS):
    """{part: {key without prefix: full key}} for the `wanted` parts; refuse families we do not load."""
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(path, "is a Stable Diffusion 2.x file (OpenCLIP text encoder); SD2.x is not supported yet")
    if any(k.startswith("conditioner.") for k in keys):
        raise CheckpointError(path, "is an SDXL file; SDXL is not supported")
    parts = {part: {} for part in PARTS}
    for key in keys:
        if key.startswith(UNET_PREFIX):
            parts["denoiser"][key[len(UNET_PREFIX):]] = key
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = key
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX):]
            if not name.startswith("text_model."):  # very old layout
                name = "text_model." + name
            if not name.endswith("embeddings.position_ids"):  # a buffer, often stored corrupt: use arange
                parts["text"][name] = key
        elif key not in _SCHEDULE_BUFFERS and not key.startswith("model_ema."):
            raise CheckpointError(path, f"unexpected key {key[:200]!r}: not a denoiser, autoencoder or text-encoder weight")
    for part in PARTS:
        if part in wanted and not parts[part]:
            raise CheckpointError(path, f"nothing recognisable inside: no {part} weights (keys starting {PREFIXES[part]!r})")
        if part not in wanted and parts[part]:
            raise CheckpointError(path, f"holds {part} weights although its metadata takes that part from elsewhere")
    return {part: parts[part] for part in wanted}


def family_name(metadata, denoiser_shapes):
    """The denoiser's family (core/families.py): from our metadata, else from the state dict's keys."""
    return metadata.get("family") or detect(denoiser_shapes)


def _config(part, metadata, shapes):
    """(label for messages, config, module class) of one part stored in a file."""
    if part == "denoiser":
        name = family_name(metadata, shapes)
        family = FAMILIES[name]
        config = family.config.from_dict(metadata[name]) if name in metadata else family.infer_config(shapes)
        return name, config, family.network
    if part == "vae":
        config = autoencoder_config_from_dict(metadata["vae"]) if "vae" in metadata else infer_autoencoder_config(shapes)
        return "vae", config, AutoencoderKL
    config = CLIPTextConfig.from_dict(metadata["text"]) if "text" in metadata else infer_text_config(shapes)
    return "text", config, CLIPTextModel


def stored_parts(metadata):
    """The parts a file holds weights for: not those taken from another file, nor a weightless autoencoder."""
    shared = metadata.get("parts_from", {})
    identity = isinstance(metadata.get("vae"), dict) and metadata["vae"].get("kind") == "identity"
    return tuple(p for p in PARTS if p not in shared and not (p == "vae" and identity))


def _build_parts(header):
    """{part: Part} for the parts stored in the file: configs from our metadata, else from key shapes
    (bounded like metadata), each built on the meta device and every key's shape checked against it."""
    path, tensors = header.path, header.tensors
    parts = {}
    for part, names in split_parts(path, tensors, stored_parts(header.metadata)).items():
        for name, key in names.items():
            if tensors[key]["dtype"] not in _FLOATING:
                raise CheckpointError(path, f"{part}: tensor {key!r} has dtype {tensors[key]['dtype']}; "
                                            "model weights must be floating point")
        shapes = {name: tuple(tensors[key]["shape"]) for name, key in names.items()}
        try:
            label, config, cls = _config(part, header.metadata, shapes)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(path, f"{part}: {e}") from None
        _check_config_dict(path, f"{label} (inferred from shapes)", config.to_dict())
        if _repeated_blocks(config) > len(names):
            raise CheckpointError(path, f"{label}: its config repeats {_repeated_blocks(config):,} blocks, more than "
                                        f"the {len(names):,} tensors the file holds for it")
        try:
            with empty_modules():
                module = cls(config)
        except (ValueError, TypeError, RuntimeError, IndexError, ZeroDivisionError) as e:
            raise CheckpointError(path, f"{label}: its config cannot be built ({type(e).__name__}: {e})") from None
        check_layout(path, label, module, shapes)
        parts[part] = Part(label, names, module)
    return parts


def _repeated_blocks(config):
    """A lower bound on the tensors of the module `config` builds (each repeated block holds at least
    one), so a config that would take long to build is refused before it is built."""
    counts = [len(getattr(config, name, ())) for name in ("channel_mult", "ch_mult")]
    counts += [getattr(config, name, 1) for name in ("num_res_blocks", "transformer_depth", "depth", "layers")]
    return math.prod(max(count, 1) for count in counts)


def check_layout(path, part, module, shapes):
    """Every key of `module` is in the file with its shape, and nothing else."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, shape in shapes.items():
        if key not in expected:
            raise CheckpointError(path, f"{part}: unexpected key {key[:200]!r}")
        if shape != expected[key]:
            raise CheckpointError(path, f"{part}: {key!r} has shape {list(shape)}, expected {list(expected[key])}")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(path, f"{part}: {len(missing)} keys missing, e.g. {', '.join(missing[:5])}")


def provide_parts(prefix, folder):
    """Let files take parts ("parts_from") from models named `prefix<file>`, resolved inside `folder` only."""
    PART_SOURCES[prefix] = Path(folder)


def can_provide_parts(name):
    """Whether a model named `name` can provide parts to another file (its name has a provided prefix)."""
    return any(name.startswith(prefix) for prefix in PART_SOURCES)


def part_source_path(path, name):
    """The file a "parts_from" entry names: <prefix><file> inside its provided folder, nothing else."""
    prefix = next((p for p in PART_SOURCES if isinstance(name, str) and name.startswith(p)), None)
    rel = name[len(prefix):] if prefix else None
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckpointError(path, f"parts_from names {str(name)[:200]!r}; only "
                                    f"{' or '.join(f'{p}<file>' for p in PART_SOURCES) or 'no'} models can provide parts")
    source = PART_SOURCES[prefix] / rel
    if not source.is_file():
        raise CheckpointError(path, f"takes parts from {name!r}, which is not in {PART_SOURCES[prefix]}")
    return source


# Parts whose weights were all found finite: ((real path, size, mtime), part), so a reload skips the pass.
_finite_parts = set()


def _load_parts(header, wanted, dtypes, device):
    """{part: module} for the wanted parts: read into the header's meta modules, built (identity
    autoencoder), or taken from the built-in file that provides them."""
    path = header.path
    identity = os.path.realpath(path), os.path.getsize(path), os.path.getmtime(path)
    modules = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for part in (p for p in wanted if p in header.parts):
                stored = header.parts[part]
                check_finite = (identity, part) not in _finite_parts
                state = {}
                for name, key in stored.keys.items():
                    tensor = f.get_tensor(key)
                    if check_finite and not torch.isfinite(tensor).all():
                        raise CheckpointError(path, f"{part}: tensor {key!r} holds NaN or inf values")
                    state[name] = tensor.to(device, dtypes[part])
                stored.module.load_state_dict(state, strict=True, assign=True)
                modules[part] = stored.module
                _finite_parts.add((identity, part))
    except SafetensorError as e:  # what the header check cannot see (the library's own rules)
        raise CheckpointError(path, f"cannot read the weights ({e})") from None
    for part in wanted:
        if part in header.sources:
            modules.update(_load_parts(header.sources[part], [part], dtypes, device))
        elif part not in modules:  # the weightless identity autoencoder
            modules[part] = IdentityAutoencoder(IdentityConfig(**header.metadata["vae"]))
    return {part: modules[part].to(device, dtypes[part]).eval().requires_grad_(False) for part in wanted}


def load_checkpoint(path, dtype=torch.float32, device="cpu", vae_dtype=None):
    """Load a whole model. The header is read and validated once; its meta-device modules get each
    tensor read from the file's memory map, checked finite, cast and assigned one at a time, so no
    second full copy is ever made."""
    header = read_header(path)
    dtypes = {"denoiser": dtype, "vae": vae_dtype or dtype, "text": dtype}
    modules = _load_parts(header, PARTS, dtypes, device)
    return Checkpoint(modules["denoiser"], modules["vae"], modules["text"], header.schedule, header.prediction,
                      os.fspath(path), header.metadata.get("training", {}).get("resolution"))


def save_checkpoint(path, denoiser, vae, text_encoder, schedule, prediction, dtype=torch.float16, extra=None,
                    parts_from=None):
    """Write our own format: one safetensors file, SD layout, configs in the metadata.

    parts_from {"vae"|"text": "builtin/<file>"}: those parts are not written; the loader takes them
    from that built-in model. An identity autoencoder is written as its config alone."""
    parts_from = dict(parts_from or {})
    family = family_of(denoiser).name
    metadata = {"format": FORMAT_VERSION, "family": family, family: denoiser.config.to_dict()}
    tensors = {}
    for part, module in (("denoiser", denoiser), ("vae", vae), ("text", text_encoder)):
        if part in parts_from:
            continue
        if part != "denoiser":
            metadata[part] = module.config.to_dict()
        for key, value in module.state_dict().items():
            tensors[PREFIXES[part] + key] = value.detach().to("cpu", dtype).contiguous()
    metadata.update({"schedule": schedule.config, "prediction": prediction, "tokenizer": TOKENIZER_ID})
    if parts_from:
        metadata["parts_from"] = parts_from
    metadata.update(extra or {})
    save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(metadata)})
