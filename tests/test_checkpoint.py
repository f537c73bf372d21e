"""Checkpoint reading, layout inference, our own format, and every refusal."""
import copy
import json
import math
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL, IdentityAutoencoder, placement
from ldm_nodes.tools.randomise import randomise
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.transformer import TransformerConfig, TransformerModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 64, num_heads=2)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.5)
TEXT = CLIPTextConfig(vocab_size=49408, width=64, layers=2, heads=2, mlp_width=128)


def tiny_modules(seed=0):
    torch.manual_seed(seed)
    modules = UNetModel(UNET), AutoencoderKL(VAE), CLIPTextModel(TEXT)
    for m in modules:  # zero-initialised output layers would hide a mix-up of the parts
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return modules


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    modules = tiny_modules()
    ck.save_checkpoint(path, *modules, TrainingSchedule("linear", 1000), "v", dtype=torch.float32)
    return path, modules


def header_only_file(path, header, metadata=None):
    """A valid file whose weights are a hole (a sparse file of zeros): enough for every header-only check."""
    entries, end = {}, 0
    for key, shape in header.items():
        size = 2 * math.prod(shape)
        entries[key] = {"dtype": "F16", "shape": shape, "data_offsets": [end, end + size]}
        end += size
    if metadata is not None:
        entries["__metadata__"] = metadata
    raw = json.dumps(entries).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + end)
    return path


def test_round_trip_reproduces_every_part(saved):
    path, (unet, vae, text) = saved
    loaded = ck.load_checkpoint(path)
    assert loaded.prediction == "v" and loaded.schedule == TrainingSchedule("linear", 1000)
    assert loaded.denoiser.config == UNET and loaded.vae.config == VAE and loaded.text_encoder.config == TEXT
    for a, b in ((unet, loaded.denoiser), (vae, loaded.vae), (text, loaded.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any(p.requires_grad for p in b.parameters())
    meta = ck.read_model_metadata(path)
    assert meta["tokenizer"] == ck.TOKENIZER_ID and meta["family"] == "unet" and meta["format"] == 1
    assert ck.training_schedule_of(path) == TrainingSchedule("linear", 1000)


def test_load_in_half_precision_with_vae_in_fp32(saved):
    path, _ = saved
    loaded = ck.load_checkpoint(path, dtype=torch.float16, vae_dtype=torch.float32)
    assert {p.dtype for p in loaded.denoiser.parameters()} == {torch.float16}
    assert {p.dtype for p in loaded.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}


def test_fp16_file_is_half_the_size(tmp_path):
    modules = tiny_modules()
    ck.save_checkpoint(tmp_path / "a.safetensors", *modules, TrainingSchedule(), "eps", dtype=torch.float32)
    ck.save_checkpoint(tmp_path / "b.safetensors", *modules, TrainingSchedule(), "eps")
    ratio = os.path.getsize(tmp_path / "b.safetensors") / os.path.getsize(tmp_path / "a.safetensors")
    assert 0.49 < ratio < 0.51


def test_sd15_key_list_is_fully_placed(tmp_path, sd15_shapes):
    """Every SD1.5 key is consumed by a module with the SD1.5 config inferred, or explicitly ignored
    (schedule buffers, EMA copies, position_ids), on the meta device: no memory."""
    shapes = sd15_shapes
    shapes.update({"alphas_cumprod": [1000], "betas": [1000], "model_ema.decay": [],
                   "model_ema.diffusion_modelinput_blocks00weight": [320, 4, 3, 3],
                   "cond_stage_model.transformer.text_model.embeddings.position_ids": [1, 77]})
    path = header_only_file(tmp_path / "sd15.safetensors", shapes)
    parts = ck.read_header(path).parts
    unet, vae, text = (parts[part].module.config for part in ck.PARTS)
    assert (unet.model_channels, unet.channel_mult, unet.num_res_blocks, unet.attention_levels) == (320, (1, 2, 4, 4), 2, (0, 1, 2))
    assert (unet.context_dim, unet.num_heads, unet.use_linear_in_transformer) == (768, 8, False)
    assert (vae.ch, vae.ch_mult, vae.z_channels, vae.scale_factor) == (128, (1, 2, 4, 4), 4, 0.18215)
    assert (text.width, text.layers, text.heads, text.vocab_size) == (768, 12, 12, 49408)
    placed = {full for part in parts.values() for full in part.keys.values()}
    ignored = set(shapes) - placed
    assert ignored == {"alphas_cumprod", "betas", "model_ema.decay", "model_ema.diffusion_modelinput_blocks00weight",
                       "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert ck.training_schedule_of(path) == TrainingSchedule("scaled_linear", 1000, 0.00085, 0.012)


def test_old_text_layout_without_text_model_prefix(tmp_path, sd15_shapes):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sd15_shapes.items()}
    path = header_only_file(tmp_path / "old.safetensors", old)
    assert "text_model.final_layer_norm.weight" in ck.read_header(path).parts["text"].keys


def test_pickles_are_refused_without_being_opened(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("model.ckpt", "model.safetensors"):  # by extension, and by content under a false name
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state_dict": Trap()}, protocol=2))
        with pytest.raises(ck.CheckpointError, match=r"pickled PyTorch file.*safetensors"):
            ck.load_checkpoint(path)
        assert name in str(pytest.raises(ck.CheckpointError, ck.read_header, path).value)
    assert not marker.exists()
    torch_zip = tmp_path / "weights.safetensors"
    torch.save({"a": torch.zeros(1)}, torch_zip)  # torch's zip format starts with PK
    with pytest.raises(ck.CheckpointError, match="pickled"):
        ck.read_header(torch_zip)


@pytest.mark.parametrize("length", [0x80, 0x80 + 0x4B50 * 256, 0x4B50])
def test_a_safetensors_header_length_that_looks_like_a_signature_is_read(tmp_path, length):
    """A header of 128 (+ 256 k) bytes makes the file start with the pickle byte \\x80, one of 0x4B50
    bytes with "PK": still safetensors, since a header follows."""
    base = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = base + b" " * (length - len(base) - 1) + b"}"
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    assert path.read_bytes()[:1] in (b"\x80", b"P")
    assert ck._read_raw(path)[0]["a"]["shape"] == [1]


ONE_TENSOR = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'


@pytest.mark.parametrize("content, problem", [
    (b"", "truncated"),
    (b"\x05\x00", "truncated"),
    (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated safetensors header"),
    (struct.pack("<Q", 5) + b"{{{{{", "corrupt safetensors header"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", len(ONE_TENSOR)) + ONE_TENSOR + b"\0" * 8, "truncated"),  # 16 data bytes promised, 8 given
])
def test_corrupt_files_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=problem) as e:
        ck.load_checkpoint(path)
    assert str(path) in str(e.value)


def test_truncated_real_file(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_checkpoint(cut)


def test_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        ck.load_checkpoint(tmp_path / "nope.safetensors")


def test_nothing_recognisable(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ck.CheckpointError, match="unexpected key 'encoder.weight'"):
        ck.load_checkpoint(tmp_path / "other.safetensors")
    save_file({"first_stage_model.x": torch.zeros(2)}, tmp_path / "vae_only.safetensors")
    with pytest.raises(ck.CheckpointError, match="nothing recognisable inside: no denoiser weights"):
        ck.load_checkpoint(tmp_path / "vae_only.safetensors")


def test_sd2_and_sdxl_are_refused_whole(tmp_path):
    path = header_only_file(tmp_path / "sd2.safetensors", {"cond_stage_model.model.token_embedding.weight": [49408, 1024]})
    with pytest.raises(ck.CheckpointError, match="Stable Diffusion 2.x.*not supported yet"):
        ck.load_checkpoint(path)
    path = header_only_file(tmp_path / "xl.safetensors", {"conditioner.embedders.0.x": [1]})
    with pytest.raises(ck.CheckpointError, match="SDXL"):
        ck.load_checkpoint(path)


def edited_copy(saved_path, tmp_path, edit):
    from safetensors.torch import load_file
    tensors = load_file(saved_path)
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, out, metadata={ck.METADATA_KEY: json.dumps(ck.read_model_metadata(saved_path))})
    return out


def test_unexpected_shape_names_key_expected_and_found(saved, tmp_path):
    key = "model.diffusion_model.out.2.weight"
    path = edited_copy(saved[0], tmp_path, lambda t: t.__setitem__(key, torch.zeros(4, 32, 1, 1)))
    with pytest.raises(ck.CheckpointError, match=r"unet: 'out.2.weight' has shape \[4, 32, 1, 1\], expected \[4, 32, 3, 3\]"):
        ck.load_checkpoint(path)


def test_missing_keys_are_listed(saved, tmp_path):
    def drop(t):
        for k in [k for k in t if k.startswith("first_stage_model.decoder.up.0.")]:
            del t[k]
    path = edited_copy(saved[0], tmp_path, drop)
    with pytest.raises(ck.CheckpointError, match=r"vae: \d+ keys missing, e\.g\. decoder\.up\.0\.block\.0"):
        ck.load_checkpoint(path)


def test_unexpected_key_in_a_part(saved, tmp_path):
    path = edited_copy(saved[0], tmp_path, lambda t: t.__setitem__("model.diffusion_model.label_emb.0.0.weight", torch.zeros(2)))
    with pytest.raises(ck.CheckpointError, match="unet: unexpected key 'label_emb.0.0.weight'"):
        ck.load_checkpoint(path)


def test_inference_without_metadata_matches_the_saved_config(tmp_path):
    """A file with our layout but no metadata (as another tool might write) infers the same shapes;
    heads fall back to the family default (head width 64 here: the UNet's channels allow only 1 head)."""
    unet = UNetModel(UNetConfig(4, 4, 64, (1, 2), 1, (1,), 1, 64, num_head_channels=64))
    vae, text = AutoencoderKL(VAE), CLIPTextModel(CLIPTextConfig(vocab_size=49408, width=64, layers=1, heads=1, mlp_width=128))
    ck.save_checkpoint(tmp_path / "x.safetensors", unet, vae, text, TrainingSchedule(), "eps")
    from safetensors.torch import load_file
    save_file(load_file(tmp_path / "x.safetensors"), tmp_path / "bare.safetensors")
    loaded = ck.load_checkpoint(tmp_path / "bare.safetensors")
    assert loaded.denoiser.config == unet.config and loaded.vae.config.ch_mult == VAE.ch_mult
    assert loaded.prediction == "eps" and loaded.schedule.beta_schedule == "scaled_linear"


# --- denoiser families, shared parts, pixel space ---------------------------------------------

TRANSFORMER = TransformerConfig(in_channels=4, out_channels=4, width=64, depth=2, heads=4, context_dim=64)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_transformer_family_round_trip(tmp_path):
    net = randomise(TransformerModel(TRANSFORMER), 1)
    _, vae, text = tiny_modules()
    ck.save_checkpoint(tmp_path / "t.safetensors", net, vae, text, TrainingSchedule(), "v", dtype=torch.float32)
    meta = ck.read_model_metadata(tmp_path / "t.safetensors")
    assert meta["family"] == "transformer" and meta["transformer"]["heads"] == 4 and "unet" not in meta
    loaded = ck.load_checkpoint(tmp_path / "t.safetensors")
    assert isinstance(loaded.denoiser, TransformerModel) and loaded.denoiser.config == TRANSFORMER
    assert_same_weights(loaded.denoiser, net)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 64)
    torch.testing.assert_close(loaded.denoiser(x, t, ctx), net(x, t, ctx))


def test_transformer_without_metadata_is_recognised_by_its_keys(tmp_path):
    """Sizes come from shapes; the head count, which shapes cannot tell, falls back to width / 64."""
    net = TransformerModel(TRANSFORMER)
    _, vae, text = tiny_modules()
    ck.save_checkpoint(tmp_path / "t.safetensors", net, vae, text, TrainingSchedule(), "eps")
    from safetensors.torch import load_file
    save_file(load_file(tmp_path / "t.safetensors"), tmp_path / "bare.safetensors")
    loaded = ck.load_checkpoint(tmp_path / "bare.safetensors")
    assert isinstance(loaded.denoiser, TransformerModel)
    assert loaded.denoiser.config == TransformerConfig(4, 4, 64, 2, 1, 64)


def test_unknown_family_is_named(tmp_path, saved):
    from safetensors.torch import load_file
    meta = ck.read_model_metadata(saved[0])
    save_file(load_file(saved[0]), tmp_path / "x.safetensors",
              metadata={ck.METADATA_KEY: json.dumps({**meta, "family": "mamba"})})
    with pytest.raises(ck.CheckpointError, match="unknown denoiser family 'mamba'"):
        ck.load_checkpoint(tmp_path / "x.safetensors")


@pytest.fixture
def builtin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setitem(ck.PART_SOURCES, "builtin/", folder)
    return folder


def test_parts_from_a_builtin_model(builtin_dir, tmp_path):
    """A file that holds only its denoiser takes the autoencoder and text encoder from a built-in model."""
    unet, vae, text = tiny_modules()
    ck.save_checkpoint(builtin_dir / "base.safetensors", unet, vae, text, TrainingSchedule(), "eps", dtype=torch.float32)
    net = randomise(TransformerModel(TRANSFORMER), 2)
    shared = {"vae": "builtin/base.safetensors", "text": "builtin/base.safetensors"}
    ck.save_checkpoint(tmp_path / "t.safetensors", net, vae, text, TrainingSchedule("linear"), "eps",
                       dtype=torch.float32, parts_from=shared)
    header = ck.read_header(tmp_path / "t.safetensors")
    assert all(k.startswith(ck.UNET_PREFIX) for k in header.tensors) and "vae" not in header.metadata
    loaded = ck.load_checkpoint(tmp_path / "t.safetensors", dtype=torch.float16, vae_dtype=torch.float32)
    assert_same_weights(loaded.vae, vae)
    assert_same_weights(loaded.text_encoder, copy.deepcopy(text).half())
    assert loaded.vae.config == vae.config and loaded.schedule.beta_schedule == "linear"
    assert {p.dtype for p in loaded.text_encoder.parameters()} == {torch.float16}


@pytest.mark.parametrize("name, problem", [
    ("../base.safetensors", "only builtin/<file> models can provide parts"),
    ("builtin/../x.safetensors", "only builtin/<file> models can provide parts"),
    ("builtin/missing.safetensors", "takes parts from 'builtin/missing.safetensors', which is not in"),
])
def test_parts_from_refuses_anything_but_a_builtin_file(builtin_dir, tmp_path, name, problem):
    unet, vae, text = tiny_modules()
    ck.save_checkpoint(tmp_path / "t.safetensors", unet, vae, text, TrainingSchedule(), "eps", parts_from={"text": name})
    with pytest.raises(ck.CheckpointError, match=re.escape(problem)):
        ck.load_checkpoint(tmp_path / "t.safetensors")


def test_parts_are_taken_one_level_only(builtin_dir, tmp_path):
    unet, vae, text = tiny_modules()
    ck.save_checkpoint(builtin_dir / "a.safetensors", unet, vae, text, TrainingSchedule(), "eps",
                       parts_from={"text": "builtin/b.safetensors"})
    ck.save_checkpoint(builtin_dir / "b.safetensors", unet, vae, text, TrainingSchedule(), "eps",
                       parts_from={"text": "builtin/a.safetensors"})
    with pytest.raises(ck.CheckpointError, match="takes them from elsewhere itself"):
        ck.load_checkpoint(builtin_dir / "a.safetensors")


def test_a_shared_part_stored_anyway_is_refused(builtin_dir, tmp_path, saved):
    from safetensors.torch import load_file
    meta = ck.read_model_metadata(saved[0])
    save_file(load_file(saved[0]), tmp_path / "x.safetensors",
              metadata={ck.METADATA_KEY: json.dumps({**meta, "parts_from": {"text": "builtin/x.safetensors"}})})
    with pytest.raises(ck.CheckpointError, match="holds text weights although its metadata takes that part from elsewhere"):
        ck.load_checkpoint(tmp_path / "x.safetensors")


def test_identity_autoencoder_is_stored_as_its_config(tmp_path):
    """Pixel space: no autoencoder weights, the loader builds the identity and it maps x to x."""
    unet = UNetModel(UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 64, num_heads=2))
    _, _, text = tiny_modules()
    ck.save_checkpoint(tmp_path / "p.safetensors", unet, IdentityAutoencoder(), text, TrainingSchedule("linear"), "eps")
    header = ck.read_header(tmp_path / "p.safetensors")
    assert not any(k.startswith(ck.VAE_PREFIX) for k in header.tensors)
    loaded = ck.load_checkpoint(tmp_path / "p.safetensors", dtype=torch.float16, vae_dtype=torch.float32)
    assert isinstance(loaded.vae, IdentityAutoencoder) and loaded.vae.config.f == 1
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.vae.encode(x).sample(), x) and torch.equal(loaded.vae.decode(x), x)
    assert placement(loaded.vae) == (torch.device("cpu"), torch.float32)
