"""GET /ldm/schedule: the plot's numbers are core/schedule.py's, every bad input is a 400 naming
its parameter, the JSON is strict (no NaN/Infinity), and model files are read header-only."""
import asyncio
import json
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ldm_nodes.nodes import model_paths, routes
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.pipeline import ScheduleSpec
from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

# The smallest modules save_checkpoint accepts (tests/test_checkpoint.py's configs, smaller still).
UNET = UNetConfig(4, 4, 32, (1,), 1, (), 1, 32, num_heads=2)
VAE = AutoencoderConfig(ch=32, ch_mult=(1,), num_res_blocks=1)
TEXT = CLIPTextConfig(vocab_size=49408, width=32, layers=1, heads=2, mlp_width=64)
MODEL_SCHEDULE = TrainingSchedule("linear", 400)  # not SD1.x's default, so a fallback would show


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def get(*queries):
    """[(status, strict JSON body)] of GET /ldm/schedule for each query, on one test server."""

    async def run():
        async with TestClient(TestServer(routes.make_app())) as client:
            out = []
            for query in queries:
                response = await client.get(routes.SCHEDULE_PATH, params=query)
                assert response.content_type == "application/json"
                out.append((response.status, _strict_json(await response.text())))
            return out

    return asyncio.run(run())


def get_one(query):
    return get(query)[0]


def nulled(values):
    return [v if torch.isfinite(torch.tensor(v)) else None for v in values]


def check_against_core(body, training, steps, spacing):
    """Every number in the body equals core's (floats survive JSON exactly)."""
    T = training.num_timesteps
    assert body["num_timesteps"] == T and body["beta_schedule"] == training.beta_schedule
    assert body["zero_terminal_snr"] == training.zero_terminal_snr
    t = torch.tensor(body["t"])
    assert t[0] == 0 and t[-1] == T - 1 and bool((t[1:] > t[:-1]).all())
    assert len(t) == min(T, routes.MAX_POINTS) and body["subsampled"] == (T > routes.MAX_POINTS)
    assert body["alpha_bar"] == nulled(training.alpha_bar[t].tolist())
    assert body["sigma"] == nulled(training.sigmas[t].tolist())
    assert body["log_snr"] == nulled(training.log_snr[t].tolist())
    sampling = sampling_schedule(training, steps, spacing)
    s = body["steps"]
    assert s["timesteps"] == sampling.timesteps.tolist() and len(s["timesteps"]) == steps
    assert s["sigmas"] == sampling.sigmas.tolist() and len(s["sigmas"]) == steps + 1 and s["sigmas"][-1] == 0
    assert all(a > b for a, b in zip(s["sigmas"], s["sigmas"][1:]))
    assert s["alpha_bar"] == (1 / (1 + sampling.sigmas[:-1] ** 2)).tolist()
    assert s["log_snr"] == (-2 * sampling.sigmas[:-1].log()).tolist()


@pytest.mark.parametrize("beta, zsnr, T, steps, spacing", [
    ("linear", False, None, 10, "leading"),
    ("scaled_linear", False, None, 50, "trailing"),
    ("cosine", False, None, 7, "linspace"),
    ("scaled_linear", True, None, 20, "karras"),
    ("linear", False, 300, 5, "exponential"),
    ("cosine", True, 10000, 1000, "karras"),
    ("scaled_linear", False, 2, 1, "trailing"),
])
def test_values_equal_core(beta, zsnr, T, steps, spacing):
    query = {"beta_schedule": beta, "steps": str(steps), "spacing": spacing, "zero_terminal_snr": str(zsnr).lower()}
    if T is not None:
        query["num_timesteps"] = str(T)
    status, body = get_one(query)
    assert status == 200, body
    training = TrainingSchedule(beta, T or 1000, zero_terminal_snr=zsnr)
    check_against_core(body, training, steps, spacing)
    # The node builds the same schedule (no model linked: 1000 timesteps).
    if T is None:
        assert body["steps"]["sigmas"] == ScheduleSpec(beta, steps, spacing, zsnr).sigmas(None).tolist()


def test_curve_subsampling():
    assert routes.curve_timesteps(512).tolist() == list(range(512))
    for T in (513, 1000, 4097, 10000):
        t = routes.curve_timesteps(T)
        assert len(t) == routes.MAX_POINTS and t[0] == 0 and t[-1] == T - 1
        assert bool((t[1:] > t[:-1]).all())
        assert (t[1:] - t[:-1]).max() <= -(-(T - 1) // (routes.MAX_POINTS - 1)) + 1  # evenly spread


def test_zero_terminal_snr_json_is_strict_and_null_means_minus_infinity():
    async def raw():
        async with TestClient(TestServer(routes.make_app())) as client:
            r = await client.get(routes.SCHEDULE_PATH, params={
                "beta_schedule": "scaled_linear", "steps": "10", "spacing": "trailing", "zero_terminal_snr": "true"})
            return r.status, await r.text()

    status, text = asyncio.run(raw())
    assert status == 200
    assert "NaN" not in text and "Infinity" not in text
    body = _strict_json(text)
    assert body["zero_terminal_snr"] is True and body["alpha_bar"][-1] == 0.0
    assert body["log_snr"][-1] is None and None not in body["log_snr"][:-1]  # -inf at t = T-1 only
    assert None not in body["sigma"] and body["sigma"][-1] == pytest.approx(4096, rel=1e-6)  # core's clamp
    for key in ("timesteps", "sigmas", "alpha_bar", "log_snr"):
        assert None not in body["steps"][key]
    # Without zero terminal SNR there is no null at all.
    _, plain = get_one({"beta_schedule": "scaled_linear", "steps": "10", "spacing": "trailing"})
    assert None not in plain["log_snr"]


def test_unknown_parameters_are_ignored_and_bools_accept_1_0():
    base = {"beta_schedule": "linear", "steps": "4", "spacing": "leading", "zero_terminal_snr": "false"}
    (s1, a), (s2, b), (s3, c) = get(base, {**base, "foo": "bar", "x": ""}, {**base, "zero_terminal_snr": "0"})
    assert s1 == s2 == s3 == 200 and a == b == c


BASE = {"beta_schedule": "scaled_linear", "steps": "20", "spacing": "karras"}


@pytest.mark.parametrize("change, parameter", [
    ({"steps": "0"}, "steps"),
    ({"steps": "1001"}, "steps"),
    ({"steps": "abc"}, "steps"),
    ({"steps": ""}, "steps"),
    ({"steps": "1.5"}, "steps"),
    ({"steps": "-3"}, "steps"),
    ({"steps": "1e2"}, "steps"),
    ({"steps": None}, "steps"),
    ({"spacing": "uniform"}, "spacing"),
    ({"spacing": None}, "spacing"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ({"beta_schedule": None}, "beta_schedule"),
    ({"zero_terminal_snr": "yes please"}, "zero_terminal_snr"),
    ({"zero_terminal_snr": ""}, "zero_terminal_snr"),
    ({"num_timesteps": "1"}, "num_timesteps"),
    ({"num_timesteps": "10001"}, "num_timesteps"),
    ({"num_timesteps": "many"}, "num_timesteps"),
    ({"num_timesteps": "10", "spacing": "leading"}, "steps"),  # 20 steps of 10 timesteps
    ({"steps": "1000", "spacing": "leading"}, "steps"),  # leading's offset pushes t past 999
    ({"beta_schedule": "model"}, "ckpt_name"),
    ({"beta_schedule": "model", "ckpt_name": ""}, "ckpt_name"),
    ({"beta_schedule": "model", "ckpt_name": "../x.safetensors"}, "ckpt_name"),
    ({"beta_schedule": "model", "ckpt_name": "/etc/x.safetensors"}, "ckpt_name"),
    ({"beta_schedule": "model", "ckpt_name": "missing.safetensors"}, "ckpt_name"),
    ({"beta_schedule": "model", "ckpt_name": "model.ckpt"}, "ckpt_name"),
    ({"beta_schedule": "model", "ckpt_name": "x" * 2000 + ".safetensors"}, "ckpt_name"),
    ({"beta_schedule": "linear", "ckpt_name": "missing.safetensors"}, "ckpt_name"),  # its T is needed
])
def test_bad_input_is_400_naming_the_parameter(change, parameter, tmp_path):
    model_paths.set_model_dirs([tmp_path])
    try:
        query = {k: v for k, v in {**BASE, **change}.items() if v is not None}
        status, body = get_one(query)
    finally:
        model_paths.set_model_dirs([])
    assert status == 400, body
    assert set(body) == {"error"} and body["error"].startswith(parameter + ":"), body


def test_parameter_given_twice_is_refused():
    status, body = get_one([*BASE.items(), ("steps", "10")])
    assert status == 400 and body["error"].startswith("steps:") and "2 times" in body["error"]


def test_num_timesteps_is_ignored_for_model_but_checked_otherwise(model_dir):
    query = {"beta_schedule": "model", "ckpt_name": "sub/tiny.safetensors", "steps": "5", "spacing": "trailing"}
    status, body = get_one({**query, "num_timesteps": "nonsense"})
    assert status == 200 and body["num_timesteps"] == MODEL_SCHEDULE.num_timesteps


def tiny_modules():
    torch.manual_seed(0)
    return UNetModel(UNET), AutoencoderKL(VAE), CLIPTextModel(TEXT)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "sub").mkdir()
    ck.save_checkpoint(root / "sub" / "tiny.safetensors", *tiny_modules(), MODEL_SCHEDULE, "v", dtype=torch.float16)
    return root


@pytest.fixture
def model_dir(model_file, monkeypatch):
    """The model folder set for the route, and every way of reading weights made to fail."""
    model_paths.set_model_dirs([model_file])

    def no_weights(*args, **kwargs):
        raise AssertionError("the schedule route must not read weights")

    monkeypatch.setattr(ck, "load_checkpoint", no_weights)
    monkeypatch.setattr(ck, "safe_open", no_weights)
    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    monkeypatch.setattr(safetensors.torch, "load", no_weights)
    monkeypatch.setattr(torch, "load", no_weights)
    reads = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ck, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    yield model_file, reads
    model_paths.set_model_dirs([])


def test_model_schedule_is_read_from_the_header_only(model_dir):
    root, reads = model_dir
    path = root / "sub" / "tiny.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    status, body = get_one({"beta_schedule": "model", "ckpt_name": "sub/tiny.safetensors", "steps": "8", "spacing": "leading"})
    assert status == 200, body
    assert body["requested_beta_schedule"] == "model" and body["ckpt_name"] == "sub/tiny.safetensors"
    check_against_core(body, MODEL_SCHEDULE, 8, "leading")
    assert reads and sum(reads) <= 8 + header_len < path.stat().st_size // 10  # the header, not the weights
    # The node, given the same model, samples exactly these sigmas.
    assert body["steps"]["sigmas"] == ScheduleSpec("model", 8, "leading").sigmas(MODEL_SCHEDULE).tolist()


def test_model_with_zero_terminal_snr_and_named_schedules_use_the_models_timesteps(model_dir):
    status, body = get_one({"beta_schedule": "model", "ckpt_name": "sub/tiny.safetensors", "steps": "6",
                            "spacing": "trailing", "zero_terminal_snr": "true"})
    assert status == 200, body
    rescaled = TrainingSchedule("linear", 400, zero_terminal_snr=True)
    check_against_core(body, rescaled, 6, "trailing")
    assert body["log_snr"][-1] is None
    # A named schedule with a linked model takes the model's T, as LDMNoiseSchedule does ...
    status, body = get_one({"beta_schedule": "cosine", "ckpt_name": "sub/tiny.safetensors", "steps": "6", "spacing": "karras"})
    assert status == 200 and body["ckpt_name"] == "sub/tiny.safetensors"
    check_against_core(body, TrainingSchedule("cosine", 400), 6, "karras")
    assert body["steps"]["sigmas"] == ScheduleSpec("cosine", 6, "karras").sigmas(MODEL_SCHEDULE).tolist()
    # ... unless num_timesteps is given.
    status, body = get_one({"beta_schedule": "cosine", "ckpt_name": "sub/tiny.safetensors", "num_timesteps": "50",
                            "steps": "6", "spacing": "karras"})
    assert status == 200 and body["num_timesteps"] == 50


def test_link_out_of_the_model_folder_is_refused(model_dir, tmp_path):
    root, _ = model_dir
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((root / "sub" / "tiny.safetensors").read_bytes())
    link = root / "escape.safetensors"
    try:
        link.symlink_to(outside)
    except OSError as e:  # Windows without the symlink privilege
        pytest.skip(f"cannot create a symlink here: {e}")
    try:
        status, body = get_one({"beta_schedule": "model", "ckpt_name": "escape.safetensors", "steps": "5", "spacing": "karras"})
    finally:
        link.unlink()
    assert status == 400 and body["error"].startswith("ckpt_name:") and "outside" in body["error"]


@pytest.mark.parametrize("content, problem", [
    (b"\x80\x04K\x01.", "pickled"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", "corrupt"),
])
def test_unreadable_model_files_are_400(model_dir, content, problem):
    root, _ = model_dir
    bad = root / "bad.safetensors"
    bad.write_bytes(content)
    try:
        status, body = get_one({"beta_schedule": "model", "ckpt_name": "bad.safetensors", "steps": "5", "spacing": "karras"})
    finally:
        bad.unlink()
    assert status == 400 and body["error"].startswith("ckpt_name:") and problem in body["error"], body


def test_add_routes_registers_on_a_route_table():
    table = web.RouteTableDef()

    @table.get("/other")
    async def other(request):
        return web.json_response({})

    assert routes.add_routes(table) is table
    registered = {(r.method, r.path) for r in table}
    assert registered == {("GET", "/other"), ("GET", routes.SCHEDULE_PATH)}


def test_routes_import_nothing_from_comfyui():
    code = ("import sys, ldm_nodes.nodes.routes; "
            "bad = {'server', 'folder_paths', 'comfy', 'nodes', 'execution'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
