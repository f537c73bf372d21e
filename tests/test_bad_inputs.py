"""Bad inputs, as an attacker would try them (issue #16): each is refused early, in one line that names
the input, with a non-zero exit and no traceback, writing nothing outside the output folder and
staying under 1 GB; or, where the input is legitimate (16-bit images, large pictures), it gives the
right result. Command-line cases run in a subprocess, whose peak memory os.wait4 reports.

Why this file is long: it is the issue's corpus, one case per bad input, each with its own file or flag.
"""
import json
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

from ldm_nodes.headless import runner
from ldm_nodes.nodes import routes
from ldm_nodes.core import attention as attention_module
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core import memory
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.errors import InputError
from ldm_nodes.core.images import read_image
from ldm_nodes.core.text import parse_weights
from ldm_nodes.tools.model_files import edited_copy

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


# `python -m ldm_nodes` with core/memory's reader of the available memory fixed to a figure, so that a
# refusal for lack of memory does not depend on the machine the test runs on.
WITH_AVAILABLE_MEMORY = """import sys
from ldm_nodes.core import memory
memory.available_memory = lambda device: ({available}, "RAM (fixed by the test)")
from ldm_nodes.cli import main
sys.exit(main(sys.argv[1:]))
"""


# Starts the command from a fresh, small process and writes "exit code, peak KiB" (os.wait4) to argv[1]. A
# child started straight from pytest would report pytest's own peak if that is larger: Linux carries the
# memory high-water mark of the process a child was spawned from into the child's ru_maxrss.
SPAWNER = """
import os, sys
pid = os.posix_spawn(sys.executable, [sys.executable, *sys.argv[2:]], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def cli(*args, cwd, stdin=None, available=None):
    """`python -m ldm_nodes ARGS` in `cwd`; its exit code, output and peak memory (os.wait4, through SPAWNER).
    With `available` (bytes), the process sees that much memory available whatever the machine has."""
    command = ["-m", "ldm_nodes"] if available is None else ["-c", WITH_AVAILABLE_MEMORY.format(available=available)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report"
        subprocess.run([sys.executable, "-c", SPAWNER, report, *command, *map(str, args)], cwd=cwd, stdout=out,
                       stderr=err, stdin=stdin, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        code, peak = map(int, report.read_text().split())
        out.seek(0)
        err.seek(0)
        return Result(code, out.read().decode(), err.read().decode(), peak * 1024)


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
    return edited_copy(PIXEL, folder / name, edit_tensors, edit_metadata)


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


# ----------------------------------------------------------------------------- workflows

def workflow(path, prompt):
    path.write_text(json.dumps(prompt))
    return path


def txt2img(**changes):
    """The shipped txt2img workflow with {"node.input": value} changes."""
    prompt = json.loads(TXT2IMG.read_text())
    for target, value in changes.items():
        node, name = target.split(".")
        prompt[node]["inputs"][name] = value
    return prompt


@pytest.fixture
def work(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def run_refused(work, prompt_or_text, *names, extra=()):
    path = work / "wf.json"
    path.write_text(prompt_or_text if isinstance(prompt_or_text, str) else json.dumps(prompt_or_text))
    result = cli("run", path, "--out", "out", *extra, cwd=work)
    assert_refused(result, *names)
    assert files_under(work) == {Path("wf.json")}  # nothing written, not even the output folder


@pytest.mark.parametrize("text, names", [
    ('{"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": ' + "9" * 5000 + "}}}", ["wf.json", "digits"]),
    ("[" * 200_000 + "]" * 200_000, ["wf.json", "nested too deeply"]),
    ('{"1": ' * 100 + "{}" + "}" * 100, ["wf.json", "nested too deeply"]),
], ids=["5000_digits", "200k_deep", "100_deep"])
def test_json_beyond_the_parsers_limits_is_named(work, text, names):
    run_refused(work, text, *names)


def test_a_chain_of_3000_nodes_is_ordered_without_recursion(work):
    """3,000 samplers, each refining the last one's latent: deeper than Python's recursion limit."""
    prompt = txt2img()
    sampler = prompt.pop("6")
    for i in range(3000):
        prompt[str(100 + i)] = {**sampler, "inputs": {**sampler["inputs"], "latent": [str(99 + i) if i else "5", 0]}}
    prompt["7"]["inputs"]["samples"] = ["3099", 0]
    order = runner.validate(prompt, out_dir=work / "out")
    assert order[-1] == "8" and [i for i in order if int(i) >= 100] == [str(100 + i) for i in range(3000)]
    prompt["8"]["inputs"]["filename_prefix"] = "a\0b"  # refused only after the whole chain is ordered
    run_refused(work, prompt, "filename_prefix", "NUL")


@pytest.mark.parametrize("name", ["cfg", "denoise", "eta", "guidance_rescale"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400],
                         ids=["nan", "inf", "-inf", "1e400", "10^400"])
def test_non_finite_floats_are_refused_at_validation_naming_the_input(work, name, value):
    prompt = txt2img()
    prompt["6"]["inputs"][name] = "PLACEHOLDER"
    text = json.dumps(prompt).replace('"PLACEHOLDER"', value)
    with pytest.raises(runner.ValidationError, match=rf"node 6 \(LDMSample\) input '{name}': .*not a finite number"):
        runner.validate(json.loads(text), out_dir=work / "out")
    if (name, value) in (("cfg", "NaN"), ("eta", "Infinity")):  # and through the command line, by --set
        run_refused(work, txt2img(), name, "not a finite number", extra=["--set", f"6.{name}={value}"])


def test_non_finite_floats_are_refused_inside_comfyui_too():
    """ComfyUI's own validation lets NaN pass min/max, so sample() refuses it, naming the input."""
    from ldm_nodes.core.pipeline import sample
    for name in ("cfg", "eta", "guidance_rescale"):
        options = {"cfg": 5.0, "eta": -1.0, "guidance_rescale": 0.0, name: float("nan")}
        with pytest.raises(InputError, match=rf"^{name}: nan is not a finite number"):
            sample(None, torch.zeros(1, 4, 8, 8), None, None, seed=0, sampler_name="euler", cfg=options["cfg"],
                   sigmas=torch.ones(2), guidance_rescale=options["guidance_rescale"], eta=options["eta"])


@pytest.mark.parametrize("target, value, names", [
    ("6.seed", 2**64, ["seed", "above the maximum"]),
    ("6.seed", -1, ["seed", "below the minimum"]),
    ("6.seed", 10**4000, ["seed", "digits"]),
    ("4.steps", 10**30, ["steps", "above the maximum"]),
    ("5.width", "x" * 1_000_000, ["width", "characters"]),
    ("6.sampler_name", "y" * 1_000_000, ["sampler_name", "characters"]),
    ("8.filename_prefix", "a\0b", ["filename_prefix", "NUL"]),
    ("8.filename_prefix", "a" * 300, ["filename_prefix", "longer than"]),
    ("8.filename_prefix", "b" * 5000, ["filename_prefix", "at most"]),
    ("8.filename_prefix", "../../escape", ["filename_prefix", "inside the output folder"]),
], ids=["seed_2^64", "seed_-1", "seed_4000_digits", "steps_1e30", "width_1MB_string", "sampler_1MB_string",
        "prefix_nul", "prefix_300", "prefix_5000", "prefix_escape"])
def test_out_of_range_values_are_refused_with_a_short_message(work, target, value, names):
    with pytest.raises(runner.ValidationError) as refused:
        runner.validate(txt2img(**{target: value}), out_dir=work / "out")
    message = str(refused.value)
    assert len(message) < 400 and all(n in message for n in names), message


def test_cli_refuses_a_huge_integer_and_a_nul_prefix(work):
    run_refused(work, txt2img(**{"6.seed": 10**4000}), "seed", "digits")
    run_refused(work, txt2img(**{"8.filename_prefix": "a\0b"}), "filename_prefix", "NUL")


def test_out_that_is_a_file_or_under_one_is_refused_before_any_node_runs(work):
    (work / "taken").write_text("")
    for out in ("taken", "taken/sub"):
        result = cli("run", TXT2IMG, "--out", out, cwd=work)
        assert_refused(result, f"--out {out}", "file")
    (work / "out").mkdir()
    (work / "out" / "ldm").write_text("")
    result = cli("run", TXT2IMG, "--out", "out", "--set", "8.filename_prefix=ldm/x", cwd=work)
    assert_refused(result, "filename_prefix", "which is a file")
    assert files_under(work) == {Path("taken"), Path("out"), Path("out/ldm")}


@pytest.mark.parametrize("batch", [16, 64])
def test_a_size_beyond_memory_is_refused_before_sampling_naming_width_height_and_batch(work, batch):
    """4096 x 4096 at batch 16 or 64 is inside the nodes' declared maximum; its sampling would need
    ~130 or ~530 GB. The process sees 16 GiB available whatever the machine has (on a 256 GB machine it
    would otherwise start a 130 GB run). The refusal's peak stays under 1 GB (assert_refused):
    LDMEmptyLatent's zeros at batch 64 would be 1 GiB if they were stored per sample."""
    result = cli("run", TXT2IMG, "--out", "out", "--set", "5.width=4096", "--set", "5.height=4096",
                 "--set", f"5.batch_size={batch}", cwd=work, available=16 * 2**30)
    assert_refused(result, "LDMSample", "width, height, batch_size", f"4096 x 4096 at batch_size {batch}", "GiB",
                   "16.00 GiB is available (RAM (fixed by the test))")
    assert files_under(work) == set()


# ----------------------------------------------------------------------------- images

def png_header_only(path, width, height):
    """A PNG that declares width x height and holds no pixel data: only a reader that decodes would notice."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


RAMP = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)


def save(path, image, **options):
    image.save(path, **options)
    return path


IMAGES = {  # name -> (make(folder) -> path, expected mean grey level or RGB, has alpha)
    "grey16.png": (lambda p: save(p, Image.fromarray(RAMP)), 0.5, False),
    "grey16_be.tif": (lambda p: save(p, Image.frombytes("I;16B", (64, 64), RAMP.astype(">u2").tobytes())), 0.5, False),
    "int32.tif": (lambda p: save(p, Image.fromarray(RAMP.astype(np.int32), "I")), 0.5, False),
    "float.tif": (lambda p: save(p, Image.fromarray(np.full((64, 64), 0.25, np.float32), "F")), 0.25, False),
    "cmyk.tif": (lambda p: save(p, Image.new("CMYK", (64, 64), (0, 0, 0, 0))), 1.0, False),
    "la.png": (lambda p: save(p, Image.new("LA", (64, 64), (128, 255))), 128 / 255, True),
    "one_bit.png": (lambda p: save(p, Image.new("1", (64, 64), 1)), 1.0, False),
    "palette_transparent.png": (lambda p: save(p, Image.new("P", (64, 64), 0), transparency=0), 0.0, True),
    "animated.gif": (lambda p: save(p, Image.new("RGB", (64, 64), (255, 255, 255)), save_all=True,
                                    append_images=[Image.new("RGB", (64, 64), (0, 0, 0))]), 1.0, False),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_image_mode_is_read_at_its_own_bit_depth(tmp_path, name):
    make, level, has_alpha = IMAGES[name]
    rgb, alpha = read_image(make(tmp_path / name))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.float32
    assert rgb.mean() == pytest.approx(level, abs=0.01), rgb.mean()
    assert (alpha is not None) == has_alpha


@pytest.mark.parametrize("make, names", [
    (lambda p: png_header_only(p / "huge.png", 10_000, 10_000), ["huge.png", "10000 x 10000", "limit"]),
    (lambda p: png_header_only(p / "bomb.png", 60_000, 60_000), ["bomb.png", "too large"]),
    (lambda p: png_header_only(p / "empty.png", 0, 0), ["empty.png"]),
    (lambda p: (p / "cut.png").write_bytes((PACK / "input" / "shapes.png").read_bytes()[:300]) and p / "cut.png",
     ["cut.png", "decode"]),
    (lambda p: (p / "text.png").write_text("not an image") and p / "text.png", ["text.png", "cannot read"]),
], ids=["10k_header", "decompression_bomb", "zero_size", "truncated", "not_an_image"])
def test_bad_images_are_refused_by_name_from_their_header(tmp_path, make, names):
    with pytest.raises(InputError) as refused:
        read_image(make(tmp_path))
    assert all(n in str(refused.value) for n in names), str(refused.value)


def img2img_in(work, image_name):
    prompt = json.loads(IMG2IMG.read_text())
    prompt["5"]["inputs"]["image"] = image_name
    return prompt


def test_load_image_in_the_runner_reads_16_bit_grey_as_grey_not_white(tmp_path):
    (tmp_path / "in").mkdir()
    IMAGES["grey16.png"][0](tmp_path / "in" / "g.png")
    from ldm_nodes.headless.session import Session, using
    from ldm_nodes.headless.standins import LoadImage
    with using(Session(tmp_path / "out", tmp_path / "in")):
        image, mask = LoadImage().load_image("g.png")
    assert image.shape == (1, 64, 64, 3) and float(image.mean()) == pytest.approx(0.5, abs=0.01)


def test_cli_refuses_huge_and_escaping_images_before_any_work(work, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    png_header_only(inputs / "huge.png", 10_000, 10_000)
    outside = png_header_only(tmp_path / "secret.png", 8, 8)
    (inputs / "link.png").symlink_to(outside)
    for name, names in (("huge.png", ["LoadImage", "image", "10000 x 10000"]), ("link.png", ["image", "outside"])):
        path = workflow(work / "wf.json", img2img_in(work, name))
        result = cli("run", path, "--out", "out", "--input-dir", inputs, cwd=work)
        assert_refused(result, *names)
    assert files_under(work) == {Path("wf.json")}


def test_a_large_image_is_encoded_in_tiles_close_to_the_whole():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.5)).eval()
    x = torch.rand(1, 3, 96, 160) * 2 - 1
    with torch.inference_mode():
        whole, one_tile = vae.encode(x).mean, vae.encode_tiled(x, tile=96).mean
        tiled = vae.encode_tiled(x, tile=32, overlap=8).mean
    assert torch.equal(one_tile, whole) and tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.1 * whole.abs().mean()


def test_chunked_attention_equals_attention_in_one_call(monkeypatch):
    q, k, v = torch.randn(2, 300, 64), torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    whole = attention_module.attention(q, k, v, heads=4)
    monkeypatch.setattr(attention_module, "CHUNK_BYTES", 2 * 4 * 37 * 200 * 4)  # 37 queries per call
    assert attention_module.query_chunk(2, 4, 300, 200, 4) == 37
    torch.testing.assert_close(attention_module.attention(q, k, v, heads=4), whole)


# ----------------------------------------------------------------------------- nll and prompts

@pytest.mark.parametrize("args, names", [
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--seed", "9" * 5000], ["--seed", "5000 characters"]),
    (["--steps", "-3"], ["--steps", "-3"]),
    (["--steps", "1"], ["--steps", "2..999"]),
], ids=["device", "seed_negative", "seed_2^64", "seed_5000_digits", "steps_negative", "steps_one"])
def test_nll_flags_are_checked_like_run(work, args, names):
    assert_refused(cli("nll", PACK / "input" / "shapes_32.png", *args, cwd=work), *names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nll_on_cuda_without_cuda_is_refused(work):
    assert_refused(cli("nll", PACK / "input" / "shapes_32.png", "--device", "cuda", cwd=work), "--device", "cuda")


def test_nll_refuses_images_from_their_header_before_decoding(work, tmp_path):
    huge = png_header_only(tmp_path / "huge.png", 10_000, 10_000)
    wrong = png_header_only(tmp_path / "wrong.png", 64, 48)
    rgba = save(tmp_path / "rgba.png", Image.new("RGBA", (32, 32)))
    for path, names in ((huge, ["huge.png", "10000 x 10000"]), (wrong, ["wrong.png", "64x48", "32x32"]),
                        (rgba, ["rgba.png", "transparency"])):
        assert_refused(cli("nll", path, cwd=work), *names)
    assert files_under(work) == set()


def test_nll_reads_a_16_bit_image_through_the_one_reader(work, tmp_path, capsys):
    from ldm_nodes.cli import main
    grey = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray(np.round(grey / 257).astype(np.uint8)).convert("RGB").save(tmp_path / "g8.png")
    assert main(["nll", str(tmp_path / "g16.png"), str(tmp_path / "g8.png"), "--steps", "4", "--json"]) == 0
    first, second = (row["nll"] for row in json.loads(capsys.readouterr().out)["images"])
    assert first == pytest.approx(second, rel=1e-6)  # the same picture, at 16 and at 8 bits


@pytest.mark.parametrize("text, names", [
    ("(red circle:1e30)", ["text", "1e+30", "red circle"]),
    ("(red:-1e9) circle", ["text", "-1e+09"]),
    ("(" * 150 + "x" + ")" * 150, ["text", "nested"]),
    ("((((((((((((((((((((((((((((((((((((((((((((((((((x))))))))))))))))))))))))))))))))))))))))))))))))))",
     ["text", "weight"]),
    ("a " * 60_000, ["text", "characters"]),
], ids=["1e30", "-1e9", "nesting", "emphasis_overflow", "long"])
def test_prompt_weights_beyond_range_are_refused_naming_the_weight(text, names):
    with pytest.raises(InputError) as refused:
        parse_weights(text)
    assert all(n in str(refused.value) for n in names), str(refused.value)


def test_cli_refuses_a_huge_prompt_weight(work):
    run_refused(work, txt2img(**{"2.text": "(red circle:1e30)"}), "LDMEncodeText", "text", "1e+30")


def test_nan_in_sampling_names_its_likely_cause():
    from ldm_nodes.core.pipeline import _likely_cause
    finite, broken = torch.zeros(1, 4, 8, 8), torch.full((1, 4, 8, 8), float("nan"))
    assert "input latent" in _likely_cause(broken, torch.float32, 5.0)
    assert "fp16" in _likely_cause(finite, torch.float16, 5.0)
    assert "cfg 25" in _likely_cause(finite, torch.float32, 25.0)
    assert "another sampler" in _likely_cause(finite, torch.float32, 5.0)


# ----------------------------------------------------------------------------- the memory estimator

MEASURE = """
import ctypes, json, sys, torch
torch.set_num_threads(1)
from ldm_nodes.core import memory, pipeline
from ldm_nodes.core.checkpoint import load_checkpoint
stage, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ck = load_checkpoint(sys.argv[4])
f = ck.vae.config.f
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
def resident():  # live memory now, with the peak reset to it
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")
    return status("VmRSS")
if stage == "encode":
    x = torch.rand(batch, size, size, 3)
    estimate, run = memory.estimate_peak("encode", ck.vae, x.shape), lambda: pipeline.encode_image(ck.vae, x)
elif stage == "decode":
    z = torch.randn(batch, 4, size // f, size // f)
    estimate, run = memory.estimate_peak("decode", ck.vae, z.shape), lambda: pipeline.decode_latent(ck.vae, z)
else:
    model = pipeline.DiffusionModel.from_checkpoint(ck)
    z = torch.zeros(batch, 4, size // f, size // f)
    c = pipeline.Conditioning(torch.randn(1, 77, ck.denoiser.config.context_dim), "")
    estimate = memory.estimate_peak("sample", ck.denoiser, z.shape, f)
    run = lambda: pipeline.sample(model, z, c, c, seed=0, sampler_name="euler", cfg=5.0,
                                     sigmas=torch.tensor([14.6, 0.0], dtype=torch.float64))
base = resident()
run()
print(json.dumps({"estimate": estimate, "measured": status("VmHWM") - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("stage, size, batch", [("encode", 256, 1), ("sample", 256, 2), ("decode", 384, 1)])
def test_the_estimate_is_within_a_factor_of_2_of_the_measured_peak(stage, size, batch):
    """Measured in a fresh process: its resident memory's peak during the stage over what was live
    before (glibc's mmap threshold fixed, so freed tensors go back to the system at once)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, stage, str(size), str(batch),
                           str(PACK / "models" / "tiny-shapes.safetensors")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert 0.5 < figures["estimate"] / figures["measured"] < 2, figures


def test_the_memory_refusal_names_the_sizes_and_both_figures(monkeypatch):
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    monkeypatch.setattr(memory, "available_memory", lambda device: (10 * 2**20, "RAM (test)"))
    with pytest.raises(InputError, match=r"^width, height, batch_size: 512 x 256 at batch_size 3: encoding needs "
                                         r"about [\d.]+ GiB and 0\.01 GiB is available \(RAM \(test\)\)"):
        memory.check_fits("encode", vae, (3, 256, 512, 3))
    memory.check_fits("encode", vae, (1, 8, 8, 3))  # small enough: no refusal
    assert memory.available_memory("cpu")[0] > 0


def test_trailing_bytes_a_pipe_and_a_nul_name_are_named(tmp_path):
    path = model_file(tmp_path, "long.safetensors")
    with open(path, "ab") as f:
        f.write(b"\0" * 7)
    with pytest.raises(ck.CheckpointError, match="7 bytes after the last tensor"):
        ck.read_header(path)
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(ck.CheckpointError, match="not a regular file"):
        ck.read_header(tmp_path / "pipe.safetensors")
    with pytest.raises(runner.ValidationError, match="image: the name holds a NUL byte"):
        runner.validate(img2img_in(tmp_path, "a\0b.png"), out_dir=tmp_path / "out", input_dir=PACK / "input")



# ----------------------------------------------------------------------------- second round (issue #27)

@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_or_a_pipe_as_the_workflow_is_read_with_a_cap(work):
    """st_size is 0 for both, so only a capped read keeps them from filling memory."""
    assert_refused(cli("run", "/dev/zero", cwd=work), "/dev/zero", "larger than 64 MB")
    producer = subprocess.Popen(["head", "-c", str(80 * 2**20), "/dev/zero"], stdout=subprocess.PIPE)
    result = cli("run", "/dev/stdin", cwd=work, stdin=producer.stdout)
    producer.stdout.close()
    producer.wait()
    assert_refused(result, "/dev/stdin", "larger than 64 MB")
    assert files_under(work) == set()


def test_a_workflow_from_a_pipe_is_read_once(tmp_path):
    """The PNG check reads the first bytes; a pipe cannot give them twice, so the JSON must keep them."""
    read, write = os.pipe()
    os.write(write, TXT2IMG.read_bytes())
    os.close(write)
    try:
        prompt, workflow = runner.read_workflow(f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert prompt == json.loads(TXT2IMG.read_text()) and workflow is None


def png_with_text(path, text, compressed=False):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("prompt", text, zip=compressed)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("text, compressed, names", [
    ("{" + " " * 200_000_000 + "}", True, ["bomb.png", "cannot read the PNG", "MAX_TEXT_CHUNK"]),
    ("[" * 100_000 + "]" * 100_000, False, ["bomb.png", "embedded prompt", "nested too deeply"]),
    ('{"1": ' + "9" * 5000 + "}", False, ["bomb.png", "embedded prompt", "digits"]),
], ids=["text_chunk_200MB", "100k_deep", "5000_digits"])
def test_a_png_workflow_goes_through_the_json_checks(work, text, compressed, names):
    png_with_text(work / "bomb.png", text, compressed)
    with pytest.raises(runner.WorkflowError) as refused:
        runner.read_workflow(work / "bomb.png")
    assert all(n in str(refused.value) for n in names), str(refused.value)
    if compressed:  # and on the command line: one line, small memory
        assert_refused(cli("run", "bomb.png", cwd=work), *names)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc and /sys")
def test_out_where_nothing_can_be_written_is_refused_before_any_node_runs(work):
    for out in ("/proc/x", "/sys/x"):
        with pytest.raises(runner.ValidationError, match=f"--out {out}: cannot write in /"):
            runner.validate(txt2img(), out_dir=out)
    assert_refused(cli("run", TXT2IMG, "--out", "/proc/x/y", cwd=work), "--out /proc/x/y", "cannot write in /proc")
    assert files_under(work) == set()  # the write check leaves nothing behind
    runner.validate(txt2img(), out_dir=work / "new" / "out")
    assert files_under(work) == set()


@pytest.fixture
def loop_models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "loop.safetensors").symlink_to("loop.safetensors")
    saved = list(routes.model_paths._model_dirs)
    routes.model_paths.set_model_dirs([folder])
    yield folder
    routes.model_paths.set_model_dirs(saved)


def test_a_symlink_loop_in_the_model_folder_is_a_400_naming_ckpt_name(loop_models, work):
    import asyncio
    from aiohttp.test_utils import TestClient, TestServer

    async def get():
        async with TestClient(TestServer(routes.make_app())) as client:
            response = await client.get(routes.SCHEDULE_PATH, params={
                "beta_schedule": "model", "steps": "10", "spacing": "leading", "ckpt_name": "loop.safetensors"})
            return response.status, await response.json()
    status, body = asyncio.run(get())
    assert status == 400 and body["error"].startswith("ckpt_name: 'loop.safetensors'") and "loop" in body["error"]
    result = cli("run", TXT2IMG, "--out", "out", "--models-dir", loop_models,
                 "--set", "1.ckpt_name=loop.safetensors", cwd=work)
    assert_refused(result, "LDMLoadModel", "ckpt_name", "Symlink loop")


def test_a_workflow_without_an_output_node_is_refused_before_its_nodes_are_checked(work):
    """3,000 nodes with bad inputs: the one problem reported is the missing output node (nothing else is
    looked at), and without --set the prompt is not even copied."""
    sampler = txt2img()["6"]
    prompt = {str(i): {**sampler, "inputs": {**sampler["inputs"], "seed": -1}} for i in range(3000)}
    assert runner.apply_overrides(prompt, []) is prompt
    with pytest.raises(runner.ValidationError) as refused:
        runner.validate(prompt, out_dir=work / "out")
    assert len(refused.value.errors) == 1 and refused.value.errors[0].startswith("workflow: no output node")


def test_a_full_disk_while_saving_leaves_no_partial_png(tmp_path, monkeypatch):
    import errno
    from PIL import ImageFile
    from ldm_nodes.headless.session import Session, using
    from ldm_nodes.headless.standins import SaveImage

    def disk_full(image, file, *args, **kwargs):  # half the pixels written, then ENOSPC
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    out = tmp_path / "out"
    with using(Session(out, tmp_path)):
        with monkeypatch.context() as patch:
            patch.setattr(ImageFile, "_save", disk_full)
            with pytest.raises(InputError, match=r"x_00001_\.png: could not be written \(No space left on device\); nothing was written"):
                SaveImage().save_images(torch.rand(2, 8, 8, 3), "x")
        assert os.listdir(out) == []
        SaveImage().save_images(torch.rand(1, 8, 8, 3), "x")  # and the next save writes the first number
    assert os.listdir(out) == ["x_00001_.png"] and Image.open(out / "x_00001_.png").size == (8, 8)


def test_the_flop_fit_matches_a_direct_count_at_a_size_it_did_not_try():
    """c0 + c1 P + c2 P^2 from the 8, 16 and 32 trials equals the operations counted at 40 x 56 directly
    (the oracle: torch's own FlopCounterMode, with the CPU attention kernel counted as the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode
    from ldm_nodes.core import eta
    from ldm_nodes.core.unet import UNetConfig, UNetModel
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                                num_res_blocks=1, attention_levels=(1,), transformer_depth=1, context_dim=16,
                                num_head_channels=16)).eval()
    context = torch.randn(2, 77, 16)
    call = lambda x: unet(x, torch.full((len(x),), 500.0), context)
    with torch.inference_mode():
        fitted = eta.fitted_flops(call, 2, 4)(40 * 56)
        with FlopCounterMode(display=False, custom_mapping=eta.EXTRA_COUNTS) as counter:
            call(torch.zeros(2, 4, 40, 56))
    assert counter.get_total_flops() > 0 and fitted == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert eta.call_seconds(call, 2, 4, 96, 96) is None  # small: no trials


def test_a_large_sample_announces_its_estimate_before_the_first_step(monkeypatch):
    from ldm_nodes.core import eta, pipeline
    from ldm_nodes.core.checkpoint import load_checkpoint
    checkpoint = load_checkpoint(PACK / "models" / "tiny-shapes.safetensors")
    model = pipeline.DiffusionModel.from_checkpoint(checkpoint)
    monkeypatch.setattr(eta, "ESTIMATE_ABOVE", 8 * 8)  # a 12 x 12 latent counts as large
    events = []
    condition = pipeline.Conditioning(torch.randn(1, 77, checkpoint.denoiser.config.context_dim), "")
    pipeline.sample(model, torch.zeros(1, 4, 12, 12), condition, condition, seed=0, sampler_name="euler", cfg=5.0,
                    sigmas=torch.tensor([14.6, 1.0, 0.0], dtype=torch.float64),
                    callback=lambda step: events.append("step"), on_estimate=lambda s: events.append(s))
    assert isinstance(events[0], float) and events[0] > 0 and events[1:] == ["step", "step"]


def test_tiled_decoding_reports_its_tiles_from_zero():
    from ldm_nodes.core.pipeline import decode_latent
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()
    seen = []
    decode_latent(vae, torch.randn(1, 4, 160, 100), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(7)]  # 3 x 2 tiles


def test_save_image_fills_comfyuis_variables(tmp_path):
    """As ComfyUI 0.3.64: %width%, %height%, %year% ... at save (folder_paths.get_save_image_path), and
    %NODE.WIDGET% (class first, then title) and %date:...% before queueing (its frontend)."""
    import time
    from ldm_nodes.headless.save_names import fill_image, fill_prompt
    now = time.struct_time((2026, 3, 4, 5, 6, 7, 0, 63, 0))
    assert fill_image("%width%x%height%/%year%-%month%-%day% %hour%%minute%%second%", 640, 480, now) == \
        "640x480/2026-03-04 050607"
    prompt = txt2img(**{"8.filename_prefix": "%LDMSample.sampler_name%_%Positive.text%_%date:yyyy-MM-dd hh%_"
                                             "%LDMSample.latent%_%nope.x%_%width%"})
    prompt["2"]["inputs"]["text"] = 'a/b:c*"d"'
    filled = fill_prompt(prompt, now)
    assert filled["8"]["inputs"]["filename_prefix"] == \
        "dpmpp_2m_a_b_c__d__2026-03-04 05_%LDMSample.latent%_%nope.x%_%width%"
    assert prompt["8"]["inputs"]["filename_prefix"].startswith("%LDMSample")  # the prompt given is not changed
    from ldm_nodes.headless.session import Session, using
    from ldm_nodes.headless.standins import SaveImage
    with using(Session(tmp_path, tmp_path)):
        saved = SaveImage().save_images(torch.rand(1, 24, 40, 3), "sized_%width%x%height%")
    assert saved["ui"]["images"][0]["filename"] == "sized_40x24_00001_.png"


def test_nll_takes_a_model_path_and_names_a_folder(work):
    result = cli("nll", PACK / "input" / "shapes_32.png", "--model", PIXEL, "--steps", "2", "-q", cwd=work)
    assert result.code == 0 and str(PACK / "input" / "shapes_32.png") in result.out, result.err
    assert_refused(cli("nll", PACK / "input", cwd=work), str(PACK / "input"), "is a folder")
    assert_refused(cli("nll", PACK / "input" / "shapes_32.png", "--model", "nope.safetensors", cwd=work),
                   "--model", "nope.safetensors")
