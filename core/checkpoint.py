"""Single-file checkpoints: read safetensors, split the parts, infer their configs, load, save.

An SD1.x file holds three parts under fixed prefixes (SD_REFERENCE.md 1.1):
    model.diffusion_model.          -> UNetModel
    first_stage_model.              -> AutoencoderKL
    cond_stage_model.transformer.   -> CLIPTextModel (very old files lack `text_model.`)
Our own files use the same layout and add, in the safetensors metadata under "ldm_nodes", the JSON
configs, the training schedule, the prediction type and the tokenizer's identity. Everything that
shapes cannot tell comes from there, else from the family's defaults (SD1.x: 8 heads, eps,
scaled_linear 0.00085..0.012).

Only safetensors is read. Pickled files (.ckpt, .pt, .bin) are refused without being opened by
pickle: unpickling runs arbitrary code.
"""
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .autoencoder import (AutoencoderKL, IdentityAutoencoder, IdentityConfig,
                          autoencoder_config_from_dict, infer_autoencoder_config)
from .meta import empty_modules
from .schedule import TrainingSchedule
from .text import CLIPTextConfig, CLIPTextModel, infer_text_config
from .transformer import TransformerConfig, TransformerModel, infer_transformer_config
from .unet import UNetConfig, UNetModel, infer_unet_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
PREFIXES = {"denoiser": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
METADATA_KEY = "ldm_nodes"
FORMAT_VERSION = 1
TOKENIZER_ID = "openai-clip-bpe-16e6"
# The pack's own models/ folder: the only place a file's "parts_from" names resolve ("builtin/<name>").
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "models"
BUILTIN_PREFIX = "builtin/"

# Denoiser families: the metadata's "family" names one; its config sits under the same key.
FAMILIES = {"unet": (UNetConfig, UNetModel, infer_unet_config),
            "transformer": (TransformerConfig, TransformerModel, infer_transformer_config)}
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

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A model file that cannot be used, with the file and the reason in the message."""

    def __init__(self, path, problem):
        super().__init__(f"{os.fspath(path)}: {problem}")


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


def read_header(path):
    """The safetensors header: ({key: {"dtype", "shape", "data_offsets"}}, metadata dict).
    Reads only the header, never the weights; refuses pickles before anything else."""
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(path, f"truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return header, metadata


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


def read_model_metadata(path):
    """Our JSON metadata of a file (empty for files that are not ours); header only, no weights."""
    _, metadata = read_header(path)
    if METADATA_KEY not in metadata:
        return {}
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"corrupt ldm_nodes metadata ({e})") from None


def training_schedule_of(path):
    """The schedule a file's model was trained with, from its header (SD1.x's when it does not say)."""
    return TrainingSchedule.from_config(read_model_metadata(path).get("schedule", SD1_SCHEDULE))


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
            raise CheckpointError(path, f"unexpected key {key!r}: not a denoiser, autoencoder or text-encoder weight")
    for part in PARTS:
        if part in wanted and not parts[part]:
            raise CheckpointError(path, f"nothing recognisable inside: no {part} weights (keys starting {PREFIXES[part]!r})")
        if part not in wanted and parts[part]:
            raise CheckpointError(path, f"holds {part} weights although its metadata takes that part from elsewhere")
    return {part: parts[part] for part in wanted}


def family_of(metadata, denoiser_shapes):
    """'unet' or 'transformer': from our metadata, else from the keys (a patch embedding means transformer)."""
    family = metadata.get("family") or ("transformer" if "patch_embed.weight" in denoiser_shapes else "unet")
    if family not in FAMILIES:
        raise ValueError(f"unknown denoiser family {family!r}; this version reads {', '.join(FAMILIES)}")
    return family


def _config(part, metadata, shapes):
    """(label for messages, config, module class) of one part stored in a file."""
    if part == "denoiser":
        family = family_of(metadata, shapes)
        config_cls, module_cls, infer = FAMILIES[family]
        return family, (config_cls.from_dict(metadata[family]) if family in metadata else infer(shapes)), module_cls
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


def infer_configs(path, header, metadata, wanted=None):
    """{part: (label, config, module class)} and the parts' keys, for the parts stored in the file,
    from our metadata, else from key shapes; every key's shape is checked against the config."""
    wanted = stored_parts(metadata) if wanted is None else wanted
    parts = split_parts(path, header, stored_parts(metadata))
    shapes = {part: {name: tuple(header[key]["shape"]) for name, key in names.items()} for part, names in parts.items()}
    configs = {}
    for part in wanted:
        try:
            configs[part] = _config(part, metadata, shapes[part])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(path, str(e)) from None
        label, config, cls = configs[part]
        check_layout(path, label, cls, config, shapes[part])
    return parts, configs


def check_layout(path, part, cls, config, shapes):
    """Every key of the module built from `config` is in the file with its shape, and nothing else."""
    with empty_modules():
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    for key, shape in shapes.items():
        if key not in expected:
            raise CheckpointError(path, f"{part}: unexpected key {key!r}")
        if shape != expected[key]:
            raise CheckpointError(path, f"{part}: {key!r} has shape {list(shape)}, expected {list(expected[key])}")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(path, f"{part}: {len(missing)} keys missing, e.g. {', '.join(missing[:5])}")


def builtin_path(path, name):
    """The file a "parts_from" entry names: builtin/<file> inside the pack's models/ folder, nothing else."""
    rel = name[len(BUILTIN_PREFIX):] if isinstance(name, str) and name.startswith(BUILTIN_PREFIX) else None
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckpointError(path, f"parts_from names {name!r}; only builtin/<file> models can provide parts")
    source = BUILTIN_DIR / rel
    if not source.is_file():
        raise CheckpointError(path, f"takes parts from {name!r}, which is not in {BUILTIN_DIR}")
    return source


def _load_parts(path, wanted, dtypes, device, nested=False):
    """{part: module} for the wanted parts: read from the file, built (identity autoencoder), or taken
    from the built-in file the metadata names (one level: that file must hold them itself)."""
    header, _ = read_header(path)
    metadata = read_model_metadata(path)
    shared = metadata.get("parts_from", {})
    if nested and any(p in shared for p in wanted):
        raise CheckpointError(path, "provides parts to another file but takes them from elsewhere itself")
    own = [p for p in wanted if p in stored_parts(metadata)]
    parts, configs = infer_configs(path, header, metadata, own)
    modules = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for part in own:
            _, config, cls = configs[part]
            with empty_modules():
                module = cls(config)
            state = {name: f.get_tensor(key).to(device, dtypes[part]) for name, key in parts[part].items()}
            module.load_state_dict(state, strict=True, assign=True)
            modules[part] = module
    for part in wanted:
        if part in shared:
            modules.update(_load_parts(builtin_path(path, shared[part]), [part], dtypes, device, nested=True))
        elif part not in modules:  # the weightless identity autoencoder
            modules[part] = IdentityAutoencoder(IdentityConfig(**metadata["vae"]))
    return {part: modules[part].to(device, dtypes[part]).eval().requires_grad_(False) for part in wanted}


def load_checkpoint(path, dtype=torch.float32, device="cpu", vae_dtype=None):
    """Load a whole model. Modules are built on the meta device and each tensor is read from the
    file's memory map, cast and assigned one at a time, so no second full copy is ever made."""
    metadata = read_model_metadata(path)
    dtypes = {"denoiser": dtype, "vae": vae_dtype or dtype, "text": dtype}
    modules = _load_parts(path, PARTS, dtypes, device)
    schedule = TrainingSchedule.from_config(metadata.get("schedule", SD1_SCHEDULE))
    return Checkpoint(modules["denoiser"], modules["vae"], modules["text"], schedule,
                      metadata.get("prediction", SD1_PREDICTION), os.fspath(path),
                      metadata.get("training", {}).get("resolution"))


def save_checkpoint(path, denoiser, vae, text_encoder, schedule, prediction, dtype=torch.float16, extra=None,
                    parts_from=None):
    """Write our own format: one safetensors file, SD layout, configs in the metadata.

    parts_from {"vae"|"text": "builtin/<file>"}: those parts are not written; the loader takes them
    from that built-in model. An identity autoencoder is written as its config alone."""
    parts_from = dict(parts_from or {})
    family = next(name for name, (_, cls, _) in FAMILIES.items() if isinstance(denoiser, cls))
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
