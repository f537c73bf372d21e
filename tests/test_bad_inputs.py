"""Bad inputs, as an attacker would try them (issue #16): each is refused early, in one line that names
the input, with a non-zero exit and no traceback, writing nothing outside the output folder and
staying under 1 GB; or, where the input is legitimate (16-bit images, large pictures), it gives the
right result. Command-line cases run in a subprocess, whose peak memory os.wait4 reports.

Why this file is long: it is the issue's corpus, one case per bad input, each with its own file or flag.
"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_nodes import routes, runner
from ldm_nodes.core import attention as attention_module
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core import memory
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.errors import InputError
from ldm_nodes.core.images import read_image
from ldm_nodes.core.text import parse_weights

PACK = Path(__file__).resolve().parents[1]
PIXEL = PACK / "models" / "tiny-shapes-pixel.safetensors"
TXT2IMG = PACK / "workflows" / "api" / "txt2img.json"
IMG2IMG = PACK / "workflows" / "api" / "img2img.json"
GB = 2**30


@dataclass
class Result:
    code: int
    out: str
    err: str
    peak: int  # the child's peak resident memory, bytes


def cli(*args, cwd):
    """`python -m ldm_nodes ARGS` in `cwd`; its exit code, output and peak memory (os.wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([sys.executable, "-m", "ldm_nodes", *map(str, args)], cwd=cwd, stdout=out,
                                   stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Result(process.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024)


def files_under(folder):
    return {p.relative_to(folder) for p in Path(folder).rglob("*")}


def assert_refused(result, *names, code=1):
    """Exit `code`, one line on stderr naming every one of `names`, no traceback, under 1 GB."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert result.peak < GB, f"{result.peak / GB:.2f} GB"


# ----------------------------------------------------------------------------- bad model files

def retyped(tensors, key, tensor):
    return {**tensors, key: tensor}


def model_file(folder, name, edit_tensors=None, edit_metadata=None):
    """A copy of the built-in pixel model with its tensors or metadata edited."""
    tensors = load_file(PIXEL)
    metadata = ck.read_header(PIXEL).metadata
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    metadata = edit_metadata(dict(metadata)) if edit_metadata else metadata
    save_file(tensors, folder / name, metadata={ck.METADATA_KEY: json.dumps(metadata)})
    return folder / name


def raw_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


FIRST = "model.diffusion_model.input_blocks.0.0.weight"
OUT = "model.diffusion_model.out.2.weight"


def nan_weights(t):
    bad = t[OUT].clone()
    bad.view(-1)[0] = float("nan")
    return retyped(t, OUT, bad)


BAD_MODELS = {  # name -> (tensor edit, metadata edit, what the message must name)
    "int_weights": (lambda t: retyped(t, FIRST, t[FIRST].to(torch.int32)), None, [FIRST, "I32"]),
    "bool_weights": (lambda t: retyped(t, FIRST, t[FIRST] > 0), None, [FIRST, "BOOL"]),
    "nan_weights": (nan_weights, None, ["denoiser", OUT, "NaN"]),
    "inf_weights": (lambda t: retyped(t, OUT, t[OUT] * float("inf")), None, ["denoiser", OUT]),
    "huge_timesteps": (None, lambda m: {**m, "schedule": {**m["schedule"], "num_timesteps": 10**9}},
                       ["schedule.num_timesteps", "1000000000"]),
    "float_timesteps": (None, lambda m: {**m, "schedule": {**m["schedule"], "num_timesteps": 1000.0}},
                        ["schedule.num_timesteps", "integer"]),
    "schedule_string": (None, lambda m: {**m, "schedule": "linear"}, ["metadata schedule", "object"]),
    "unet_not_object": (None, lambda m: {**m, "unet": 5}, ["metadata unet", "object"]),
    "huge_channels": (None, lambda m: {**m, "unet": {**m["unet"], "model_channels": 10**7}},
                      ["unet.model_channels"]),
    "deep_unet": (None, lambda m: {**m, "unet": {**m["unet"], "num_res_blocks": 30, "transformer_depth": 60}},
                  ["unet", "blocks"]),
    "huge_vocab": (None, lambda m: {**m, "text": {"vocab_size": 10**9}}, ["text.vocab_size"]),
    "bad_prediction": (None, lambda m: {**m, "prediction": "noise"}, ["metadata prediction"]),
    "nan_beta": (None, lambda m: {**m, "schedule": {**m["schedule"], "beta_start": float("nan")}},
                 ["schedule.beta_start"]),
    "parts_from_escape": (None, lambda m: {**m, "parts_from": {"text": "builtin/../../etc/passwd"}}, ["parts_from"]),
    "resolution_string": (None, lambda m: {**m, "training": {"resolution": "32"}}, ["training.resolution"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for name, (tensors, metadata, _) in BAD_MODELS.items():
        model_file(folder, f"{name}.safetensors", tensors, metadata)
    model_file(folder, "good.safetensors")
    one = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    raw_file(folder / "overlap.safetensors", {FIRST: one, OUT: {**one, "data_offsets": [4, 12]}}, b"\0" * 12)
    raw_file(folder / "gap.safetensors", {FIRST: one, OUT: {**one, "data_offsets": [12, 20]}}, b"\0" * 20)
    raw_file(folder / "entry_not_object.safetensors", {FIRST: 5})
    raw_file(folder / "shape_lies.safetensors", {FIRST: {**one, "shape": [10**6]}}, b"\0" * 8)
    raw_file(folder / "unknown_dtype.safetensors", {FIRST: {**one, "dtype": "Q9"}}, b"\0" * 8)
    raw_file(folder / "metadata_not_strings.safetensors", {"__metadata__": {"ldm_nodes": {"a": 1}}, FIRST: one},
             b"\0" * 8)
    raw = b'{"__metadata__": {"ldm_nodes": "{\\"schedule\\": {\\"num_timesteps\\": 1' + b"0" * 5000 + b'}}"}}'
    (folder / "digits.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    raw = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (folder / "nested.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return folder


HEADER_CASES = {**{name: names for name, (_, _, names) in BAD_MODELS.items() if name not in
                   ("nan_weights", "inf_weights")},
                "overlap": [OUT, "overlap"], "gap": [OUT, "gap"], "entry_not_object": [FIRST, "not an object"],
                "shape_lies": [FIRST, "data_offsets"], "unknown_dtype": [FIRST, "Q9"],
                "metadata_not_strings": ["__metadata__"], "digits": ["ldm_nodes metadata"],
                "nested": ["RecursionError"]}


@pytest.mark.parametrize("name", sorted(HEADER_CASES))
def test_the_header_validator_names_the_file_and_the_field(models, name):
    path = models / f"{name}.safetensors"
    with pytest.raises(ck.CheckpointError) as refused:
        ck.read_header(path)
    assert isinstance(refused.value, InputError) and refused.value.name == str(path)
    for part in HEADER_CASES[name]:
        assert part in str(refused.value), str(refused.value)


@pytest.mark.parametrize("name", sorted(HEADER_CASES))
def test_a_header_the_loader_refuses_is_refused_by_the_route(models, name, monkeypatch):
    monkeypatch.setattr(routes.model_paths, "resolve_model", lambda ckpt_name: models / ckpt_name)
    with pytest.raises(routes.BadRequest) as refused:
        routes.model_schedule(f"{name}.safetensors")
    assert str(refused.value).startswith("ckpt_name:") and all(p in str(refused.value) for p in HEADER_CASES[name])


def test_non_finite_weights_are_found_at_load_and_remembered_per_file(models, monkeypatch):
    with pytest.raises(ck.CheckpointError, match=r"denoiser: tensor .*out\.2\.weight.* holds NaN or inf"):
        ck.load_checkpoint(models / "nan_weights.safetensors")
    ck.load_checkpoint(models / "good.safetensors")
    checks = []
    monkeypatch.setattr(ck.torch, "isfinite", lambda t: checks.append(1) or torch.ones((), dtype=torch.bool))
    ck.load_checkpoint(models / "good.safetensors")
    assert checks == []  # the good file was checked once, by its first load


def test_cli_refuses_a_bad_model_at_load_naming_the_tensor(models, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("int_weights", "nan_weights", "huge_timesteps"):
        result = cli("run", TXT2IMG, "--out", "out", "--models-dir", models,
                     "--set", f"1.ckpt_name={name}.safetensors", cwd=work)
        assert_refused(result, "LDMLoadModel", *BAD_MODELS[name][2])
        result = cli("nll", PACK / "input" / "shapes_32.png", "--model", f"{name}.safetensors", "--models-dir",
                     models, cwd=work)
        assert_refused(result, *BAD_MODELS[name][2])
    assert files_under(work) == set()
