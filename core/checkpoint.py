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

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .autoencoder import AutoencoderConfig, AutoencoderKL, infer_autoencoder_config
from .schedule import TrainingSchedule
from .text import CLIPTextConfig, CLIPTextModel, infer_text_config
from .unet import UNetConfig, UNetModel, infer_unet_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
METADATA_KEY = "ldm_nodes"
FORMAT_VERSION = 1
TOKENIZER_ID = "openai-clip-bpe-16e6"

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

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    schedule: TrainingSchedule
    prediction: str
    path: str


def read_header(path):
    """The safetensors header: ({key: {"dtype", "shape", "data_offsets"}}, metadata dict).
    Reads only the header, never the weights; refuses pickles before anything else."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            _refuse_pickles(path, head)
            if len(head) < 8:
                raise CheckpointError(path, "truncated: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(path, f"corrupt or truncated safetensors header (length {n}, file {size} bytes)")
            raw = f.read(n)
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


def _refuse_pickles(path, head):
    pickled = head[:1] == b"\x80" or head[:2] == b"PK" or os.fspath(path).lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl"))
    if pickled:
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


def split_parts(path, keys):
    """{part: {key without prefix: full key}} for the three parts; refuse families we do not load."""
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(path, "is a Stable Diffusion 2.x file (OpenCLIP text encoder); SD2.x is not supported yet")
    if any(k.startswith("conditioner.") for k in keys):
        raise CheckpointError(path, "is an SDXL file; SDXL is not supported")
    parts = {"unet": {}, "vae": {}, "text": {}}
    for key in keys:
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = key
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = key
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX):]
            if not name.startswith("text_model."):  # very old layout
                name = "text_model." + name
            if not name.endswith("embeddings.position_ids"):  # a buffer, often stored corrupt: use arange
                parts["text"][name] = key
        elif key not in _SCHEDULE_BUFFERS and not key.startswith("model_ema."):
            raise CheckpointError(path, f"unexpected key {key!r}: not a UNet, autoencoder or text-encoder weight")
    for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_PREFIX)):
        if not parts[part]:
            raise CheckpointError(path, f"nothing recognisable inside: no {part} weights (keys starting {prefix!r})")
    return parts


def infer_configs(path, header, metadata):
    """(UNetConfig, AutoencoderConfig, CLIPTextConfig) from our metadata, else from key shapes."""
    parts = split_parts(path, header)
    shapes = {part: {name: tuple(header[key]["shape"]) for name, key in names.items()} for part, names in parts.items()}
    try:
        if "unet" in metadata:
            configs = (UNetConfig.from_dict(metadata["unet"]), AutoencoderConfig.from_dict(metadata["vae"]),
                       CLIPTextConfig.from_dict(metadata["text"]))
        else:
            configs = (infer_unet_config(shapes["unet"]), infer_autoencoder_config(shapes["vae"]),
                       infer_text_config(shapes["text"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, str(e)) from None
    for (part, names), config, cls in zip(parts.items(), configs, (UNetModel, AutoencoderKL, CLIPTextModel)):
        check_layout(path, part, cls, config, shapes[part])
    return parts, configs


def check_layout(path, part, cls, config, shapes):
    """Every key of the module built from `config` is in the file with its shape, and nothing else."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    for key, shape in shapes.items():
        if key not in expected:
            raise CheckpointError(path, f"{part}: unexpected key {key!r}")
        if shape != expected[key]:
            raise CheckpointError(path, f"{part}: {key!r} has shape {list(shape)}, expected {list(expected[key])}")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(path, f"{part}: {len(missing)} keys missing, e.g. {', '.join(missing[:5])}")


def load_checkpoint(path, dtype=torch.float32, device="cpu", vae_dtype=None):
    """Load a whole model. Modules are built on the meta device and each tensor is read from the
    file's memory map, cast and assigned one at a time, so no second full copy is ever made."""
    header, metadata = read_header(path)
    ours = read_model_metadata(path)
    parts, configs = infer_configs(path, header, ours)
    dtypes = {"unet": dtype, "vae": vae_dtype or dtype, "text": dtype}
    modules = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for (part, names), config, cls in zip(parts.items(), configs, (UNetModel, AutoencoderKL, CLIPTextModel)):
            with torch.device("meta"):
                module = cls(config)
            state = {name: f.get_tensor(key).to(device, dtypes[part]) for name, key in names.items()}
            module.load_state_dict(state, strict=True, assign=True)
            modules[part] = module.to(device).eval().requires_grad_(False)
    schedule = TrainingSchedule.from_config(ours.get("schedule", SD1_SCHEDULE))
    return Checkpoint(modules["unet"], modules["vae"], modules["text"], schedule,
                      ours.get("prediction", SD1_PREDICTION), os.fspath(path))


def save_checkpoint(path, unet, vae, text_encoder, schedule, prediction, dtype=torch.float16, extra=None):
    """Write our own format: one safetensors file, SD layout, configs in the metadata."""
    tensors = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text_encoder)):
        for key, value in module.state_dict().items():
            tensors[prefix + key] = value.detach().to("cpu", dtype).contiguous()
    metadata = {"format": FORMAT_VERSION, "family": "unet", "unet": unet.config.to_dict(),
                "vae": vae.config.to_dict(), "text": text_encoder.config.to_dict(),
                "schedule": schedule.config, "prediction": prediction, "tokenizer": TOKENIZER_ID, **(extra or {})}
    save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(metadata)})
