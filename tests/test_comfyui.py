"""The pack inside a real ComfyUI server: optional, skipped unless COMFYUI_DIR names a checkout.

ComfyUI is not on PyPI; CI builds one from the snapshot in ../shared/comfyui (.ci/run sets the variables
below), and a person can point this suite at their own. Set COMFYUI_DIR to the checkout (the folder holding main.py) and, when ComfyUI's requirements
live in another environment, COMFYUI_PYTHON to that interpreter (default: the one running pytest).

    COMFYUI_DIR=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python python -m pytest tests/test_comfyui.py

Nothing in the checkout is changed: the server runs with --base-directory pointing at a temporary
folder whose custom_nodes/ldm_nodes is a link to this repository (so the checkout's own custom nodes
are not loaded, and this repository is what is tested), whose models/ldm holds a tiny random model,
and a second tiny model comes from a separate folder named by an extra_model_paths yaml, the way
users add model folders. Output, input, temp, user files and the database go to the temporary
folder too. The server listens on 127.0.0.1 on a free port and is stopped at the end.

Checked: the pack imports without errors; it copies its example inputs into the (absent) input
folder; GET /object_info lists the seven nodes with the contract's
inputs and both model files; GET /ldm/schedule and /api/ldm/schedule; GET /extensions serves the
panel's JS; every workflows/api/*.json runs to execution_success over the websocket with per-step
progress and preview frames, and its SaveImage files exist; a bad ckpt_name is refused by
validation; POST /interrupt stops a long run; POST /free, then a run loads the models again; core's
SamplerCustom samples a core MODEL (a small SD2-shaped UNet with random weights) with LDMSamplerSelect's
SAMPLER, its euler matching core's own. LDMComfyLikelihood scores an image under CheckpointLoaderSimple's
MODEL, VAE and CLIPTextEncode's CONDITIONING in a graph, and, in a process of COMFYUI_PYTHON, under SD1-,
SD2 (v)- and SDXL-shaped random checkpoints that core detects, matching the pack's own bound on SD1.x
(and LDMComfyClassify its LDMClassify). A model that `train --data` wrote from a folder of captioned
pictures runs once dropped into models/ldm.
Masks: the runner's stand-ins declare the inputs of ComfyUI's own mask nodes; core's SetLatentNoiseMask
on LDMEncodeImage's latent makes LDMSample keep the latent outside the mask exactly (read back through
core's SaveLatent), and core's ImageCompositeMasked then gives the original pixels outside the mask.
comfy_host.ComfyHost (the nodes' host inside ComfyUI; tests/test_sampler_select.py uses a stub host) is
checked against ComfyUI's own modules in a process of COMFYUI_PYTHON: device, memory manager, progress
bar hook with previews, interruption, KSAMPLER, and the entry configuring it.

The frontends: in headless Chromium (Debian's chromium, driven over the DevTools protocol), every
workflows/*.json loads, the schedule panel draws and the graph runs with its image coming back, in the
server's default frontend and, when COMFYUI_FRONTEND_ROOT names another frontend's static folder (build.sh
DEST 1.58.1 prints it), in that one on a second server, with Comfy.VueNodes.Enabled off and on.

Why this file is long: one server is started per module (about 15-45 s), so every check that needs a
real ComfyUI shares it here; the server harness alone is about 150 lines.
"""
import asyncio
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("COMFYUI_DIR is not set (path of a ComfyUI checkout)", allow_module_level=True)
aiohttp = pytest.importorskip("aiohttp")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_nodes.core.checkpoint import save_checkpoint  # noqa: E402
from ldm_nodes.core.schedule import TrainingSchedule  # noqa: E402
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from ldm_nodes.core.unet import UNetConfig, UNetModel  # noqa: E402
from ldm_nodes.headless.standins import STAND_INS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(COMFYUI_DIR).expanduser().resolve()
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK_LINK = "ldm_nodes"
MODEL = "ldm_nodes_test_tiny.safetensors"  # in models/ldm under the base directory
EXTRA_MODEL = "ldm_nodes_test_extra.safetensors"  # in a folder named by extra_model_paths.yaml
START_TIMEOUT = 300  # the first start compiles and imports a lot: about 45 s on 2 CPU cores
RUN_TIMEOUT = 300
NODES = {  # contract (ARCHITECTURE.md section 2): input names in order, required then optional
    "LDMLoadModel": (["ckpt_name", "precision"], []),
    "LDMEncodeText": (["text_encoder", "text"], []),
    "LDMNoiseSchedule": (["beta_schedule", "steps", "spacing", "zero_terminal_snr"], ["model"]),
    "LDMEmptyLatent": (["vae", "width", "height", "batch_size"], []),
    "LDMEncodeImage": (["vae", "image"], ["mask", "grow_mask_by"]),
    "LDMSample": (["model", "schedule", "positive", "negative", "latent", "seed", "sampler_name", "cfg", "denoise"],
                  ["sigmas", "eta", "guidance_rescale", "ddpm_variance"]),
    "LDMDecodeLatent": (["vae", "samples"], []),
    "LDMLikelihood": (["model", "vae", "image", "variance", "steps"], ["conditioning"]),
    "LDMSamplerSelect": (["sampler_name", "eta", "ddpm_variance"], []),
    "LDMClassify": (["image", "model", "text_encoder", "vae", "prompts", "steps", "seed"], []),
    "LDMComfyLikelihood": (["model", "vae", "image", "conditioning", "variance", "steps"], []),
    "LDMComfyClassify": (["image", "model", "clip", "vae", "prompts", "steps", "seed"], []),
    "LDMCompileModel": (["model"], []),
}
WORKFLOWS = sorted((REPO / "workflows" / "api").glob("*.json"))


def tiny_model(path, seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 64, num_heads=2))
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    text = CLIPTextModel(CLIPTextConfig(width=64, layers=1, heads=2, mlp_width=128))
    save_checkpoint(path, unet, vae, text, TrainingSchedule(), "eps", dtype=torch.float32)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root, front_end_root=None):
        self.root = root
        self.front_end_root = front_end_root
        self.base = root / "base"
        self.log_path = root / "comfyui.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n=60):
        return "\n".join(self.log().splitlines()[-n:])

    def start(self):
        cli = (COMFY / "comfy" / "cli_args.py").read_text(errors="replace")
        if "--base-directory" not in cli:
            pytest.skip("this ComfyUI has no --base-directory (added 2025-01); update it")
        # no input/: the pack puts its workflows' example pictures there at load (nodes/examples.py)
        for sub in ("custom_nodes", "models/ldm", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(REPO, self.base / "custom_nodes" / PACK_LINK, target_is_directory=True)
        except OSError as e:
            pytest.skip(f"cannot link the pack into custom_nodes: {e}")
        tiny_model(self.base / "models" / "ldm" / MODEL)
        extra = self.root / "extra_models"
        (extra / "ldm").mkdir(parents=True)
        tiny_model(extra / "ldm" / EXTRA_MODEL, seed=1)
        config = self.root / "extra_model_paths.yaml"
        config.write_text(f"ldm_nodes_test:\n    base_path: {json.dumps(str(extra))}\n    ldm: ldm\n")
        args = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(self.base),
                "--extra-model-paths-config", str(config)]
        if self.front_end_root:
            args += ["--front-end-root", str(self.front_end_root)]
        for flag, value in (("--output-directory", self.base / "output"), ("--input-directory", self.base / "input"),
                            ("--temp-directory", self.base / "temp"), ("--user-directory", self.base / "user"),
                            ("--database-url", f"sqlite:///{self.root / 'comfyui.db'}")):
            if flag in cli:
                args += [flag, str(value)]
        env = dict(os.environ)
        # Torch's OpenMP threads spin-wait: on a small machine shared with other work, two threads
        # made a tiny model 100x slower (40 s for 20 steps); one thread runs them in 0.3 s.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=COMFY, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if asyncio.run(self.get_json("/system_stats")):
                    return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    async def get_json(self, path, expect=200):
        async with aiohttp.ClientSession() as s:
            async with s.get(self.url + path, timeout=aiohttp.ClientTimeout(total=60)) as r:
                assert r.status == expect, f"GET {path}: {r.status} {await r.text()}"
                return await r.json()

    async def post(self, session, path, body):
        async with session.post(self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, await r.json(content_type=None) if r.content_length != 0 else None

    async def run(self, prompt, interrupt_at=None, timeout=RUN_TIMEOUT):
        """POST a prompt and follow it on the websocket to its end. Returns (end event, its data,
        progress events, binary frames, history entry)."""
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                status, body = await self.post(s, "/prompt", {"prompt": prompt, "client_id": client_id})
                assert status == 200, f"POST /prompt: {status} {body}"
                prompt_id = body["prompt_id"]
                progress, frames, interrupted = [], [], False
                deadline = time.monotonic() + timeout
                while True:
                    left = deadline - time.monotonic()
                    assert left > 0, f"no end of prompt within {timeout} s:\n{self.log_tail()}"
                    msg = await ws.receive(timeout=left)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        frames.append(msg.data)
                        continue
                    assert msg.type == aiohttp.WSMsgType.TEXT, f"websocket closed: {msg}\n{self.log_tail()}"
                    event = json.loads(msg.data)
                    kind, data = event["type"], event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if kind == "progress":
                        progress.append(data)
                        if interrupt_at is not None and data["value"] >= interrupt_at and not interrupted:
                            assert (await self.post(s, "/interrupt", {}))[0] == 200
                            interrupted = True
                    if kind in ("execution_success", "execution_error", "execution_interrupted"):
                        break
            # The history entry is written just after execution_success is sent.
            for _ in range(100):
                async with s.get(f"{self.url}/history/{prompt_id}") as r:
                    history = await r.json()
                if prompt_id in history:
                    break
                await asyncio.sleep(0.1)
            return kind, data, progress, frames, history.get(prompt_id)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("comfyui"))
    srv.start()
    yield srv
    srv.stop()


_seeds = itertools.count(1000)


def workflow(path, ckpt_name=MODEL, steps=None):
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        if node["class_type"] == "LDMLoadModel":
            node["inputs"]["ckpt_name"] = ckpt_name
        if steps is not None and node["class_type"] == "LDMNoiseSchedule":
            node["inputs"]["steps"] = steps
        if node["class_type"] == "LDMSample":  # ComfyUI caches outputs across prompts by their inputs
            node["inputs"]["seed"] = next(_seeds)
    return prompt


def test_pack_imports_without_errors(server):
    log = server.log()
    assert "IMPORT FAILED" not in log, server.log_tail()
    assert f"custom_nodes{os.sep}{PACK_LINK}" in log, "the pack is not in the import times list:\n" + log
    blocks = log.split("Traceback (most recent call last):")[1:]
    ours = [b for b in blocks if PACK_LINK in b or str(REPO) in b]
    assert not ours, "tracebacks from the pack:\n" + "\n".join(ours)


def test_the_example_inputs_are_copied_into_an_empty_input_folder(server):
    """The server started with no input folder: the pack made it and copied every picture the shipped
    workflows load, and said so in one log line (test_api_workflow_runs then runs them all)."""
    used = {n["inputs"]["image"] for path in WORKFLOWS for n in json.loads(path.read_text()).values()
            if n["class_type"] == "LoadImage"}
    assert used and all((REPO / "input" / name).is_file() for name in used)
    for name in sorted((REPO / "input").glob("*.png")):
        assert (server.base / "input" / name.name).read_bytes() == name.read_bytes()
    [line] = [line for line in server.log().splitlines() if "copied the example inputs" in line]
    assert "inpaint.png, shapes.png, shapes_32.png" in line and str(server.base / "input") in line


def test_object_info_lists_the_nodes(server):
    info = asyncio.run(server.get_json("/object_info"))
    for name, (required, optional) in NODES.items():
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        assert list(node["input"]["required"]) == required, name
        assert list(node["input"].get("optional", {})) == optional, name
        assert node["python_module"].endswith(PACK_LINK)
    assert info["LDMLoadModel"]["output"] == ["LDM_MODEL", "LDM_TEXT_ENCODER", "LDM_VAE"]
    names = info["LDMLoadModel"]["input"]["required"]["ckpt_name"][0]
    assert MODEL in names and EXTRA_MODEL in names, names
    assert all(n.endswith(".safetensors") for n in names)
    assert info["LDMNoiseSchedule"]["input"]["required"]["beta_schedule"][0][0] == "model"


def test_schedule_route(server):
    for prefix in ("", "/api"):
        body = asyncio.run(server.get_json(f"{prefix}/ldm/schedule?beta_schedule=linear&steps=10&spacing=karras"))
        sigmas = body["steps"]["sigmas"]
        assert len(sigmas) == 11 and sigmas[-1] == 0 and sigmas == sorted(sigmas, reverse=True)
        assert body["beta_schedule"] == "linear" and body["num_timesteps"] == 1000
    body = asyncio.run(server.get_json(f"/ldm/schedule?beta_schedule=model&steps=5&spacing=leading&ckpt_name={MODEL}"))
    assert body["beta_schedule"] == TrainingSchedule().beta_schedule and len(body["steps"]["timesteps"]) == 5
    error = asyncio.run(server.get_json("/ldm/schedule?beta_schedule=model&steps=5&spacing=leading", expect=400))
    assert error["error"].startswith("ckpt_name")


def test_extensions_serve_the_panel(server):
    listed = asyncio.run(server.get_json("/extensions"))
    for name in ("ldm_schedule_panel.js", "schedule_plot.js"):
        path = f"/extensions/{PACK_LINK}/{name}"
        assert listed.count(path) == 1, listed
        text = asyncio.run(_get_text(server.url + path))
        assert text == (REPO / "web" / name).read_text()


async def _get_text(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200, url
            return await r.text()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_api_workflow_runs(server, path):
    prompt = workflow(path)
    kind, data, progress, frames, history = asyncio.run(server.run(prompt))
    assert kind == "execution_success", f"{kind}: {data}\n{server.log_tail()}"
    samplers = {k for k, n in prompt.items() if n["class_type"] == "LDMSample"}
    scorers = {k for k, n in prompt.items() if n["class_type"] in ("LDMLikelihood", "LDMClassify")}
    assert {p["node"] for p in progress} == samplers | scorers
    for node in samplers:
        steps = [p for p in progress if p["node"] == node]
        assert steps[-1]["value"] == steps[-1]["max"] and len(steps) == steps[-1]["max"]
    # One preview per sampling step: event type PREVIEW_IMAGE (1), image type JPEG (1), a decodable image.
    assert len(frames) == len([p for p in progress if p["node"] in samplers])
    if frames:
        assert {f[:8] for f in frames} == {bytes([0, 0, 0, 1, 0, 0, 0, 1])}
        Image.open(io.BytesIO(frames[-1][8:])).verify()
    assert history["status"]["status_str"] == "success"
    saves = {k for k, n in prompt.items() if n["class_type"] == "SaveImage"}
    assert set(history["outputs"]) == saves
    for node in saves:
        images = history["outputs"][node]["images"]
        assert len(images) == (10 if prompt[node]["inputs"]["filename_prefix"] == "ldm_trajectory" else 1)
        for image in images:  # the trajectory's save: one image per sampling step
            file = server.base / "output" / image["subfolder"] / image["filename"]
            with Image.open(file) as im:
                assert im.mode == "RGB" and min(im.size) >= 8


def test_likelihood_node_scores_an_image_and_previews_its_plot(server):
    """LoadImage -> LDMLikelihood (linked to the caption) -> PreviewImage of the plot: the FLOAT and
    IMAGE outputs pass through the host, and progress reaches the end."""
    prompt = {
        "1": {"class_type": "LDMLoadModel", "inputs": {"ckpt_name": MODEL, "precision": "auto"}},
        "2": {"class_type": "LDMEncodeText", "inputs": {"text_encoder": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "shapes.png"}},
        "4": {"class_type": "LDMLikelihood", "inputs": {"model": ["1", 0], "vae": ["1", 2], "image": ["3", 0],
                                                        "variance": "beta", "steps": 20, "conditioning": ["2", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }
    kind, data, progress, _, history = asyncio.run(server.run(prompt))
    assert kind == "execution_success", f"{kind}: {data}\n{server.log_tail()}"
    assert progress and {p["node"] for p in progress} == {"4"} and progress[-1]["value"] == progress[-1]["max"]
    (image,) = history["outputs"]["5"]["images"]
    assert image["type"] == "temp"
    [file] = (server.base / "temp").rglob(image["filename"])  # ComfyUI nests a temp/ of its own in there
    with Image.open(file) as im:
        assert im.size == (640, 400)


def core_sd1_checkpoint(path):
    """An SD1.x single file core ComfyUI detects (SD15) and loads with its text encoder: a one-level UNet of
    SD1's width, SD's autoencoder and CLIP-L, random weights in fp16 (466 MB)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    parts = {"model.diffusion_model.": UNetModel(UNetConfig(4, 4, 320, (1,), 1, (0,), 1, 768, num_heads=8)),
             "first_stage_model.": AutoencoderKL(AutoencoderConfig()),
             "cond_stage_model.transformer.": CLIPTextModel(CLIPTextConfig())}
    save_file({prefix + k: v.half().contiguous() for prefix, module in parts.items()
               for k, v in module.state_dict().items() if not k.endswith("position_ids")}, path)


def test_the_bound_of_a_checkpoint_core_loads_runs_in_a_graph(server):
    """CheckpointLoaderSimple -> CLIPTextEncode -> LDMComfyLikelihood (with LoadImage) -> PreviewImage of the
    plot, and LDMComfyClassify on the same MODEL, CLIP and VAE: core's objects reach the nodes, and their
    progress reaches the end. The numbers are checked against the pack's own in
    test_the_bound_under_models_core_comfyui_loads."""
    (server.base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    core_sd1_checkpoint(server.base / "models" / "checkpoints" / "ldm_nodes_test_sd1.safetensors")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ldm_nodes_test_sd1.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "shapes.png"}},
        "4": {"class_type": "LDMComfyLikelihood", "inputs": {"model": ["1", 0], "vae": ["1", 2], "image": ["3", 0],
                                                             "conditioning": ["2", 0], "variance": "beta_tilde",
                                                             "steps": 10}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
        "6": {"class_type": "LDMComfyClassify", "inputs": {"image": ["3", 0], "model": ["1", 0], "clip": ["1", 1],
                                                           "vae": ["1", 2], "prompts": "a red circle\na blue square",
                                                           "steps": 4, "seed": 0}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    }
    kind, data, progress, _, history = asyncio.run(server.run(prompt))
    assert kind == "execution_success", f"{kind}: {data}\n{server.log_tail()}"
    for node in ("4", "6"):
        steps = [p for p in progress if p["node"] == node]
        assert steps and steps[-1]["value"] == steps[-1]["max"], progress
    for node in ("5", "7"):
        (image,) = history["outputs"][node]["images"]
        [file] = (server.base / "temp").rglob(image["filename"])
        with Image.open(file) as im:
            assert im.size == (640, 400)


def test_model_from_extra_model_paths_runs(server):
    kind, data, *_ = asyncio.run(server.run(workflow(REPO / "workflows" / "api" / "txt2img.json", EXTRA_MODEL, 2)))
    assert kind == "execution_success", data


def test_a_model_trained_on_a_folder_of_pictures_runs(server, tmp_path):
    """`train --data` on a few captioned pictures that are not the procedural shapes (default tiny
    configs, a few steps), its model.safetensors dropped into models/ldm of the running server, then
    picked by name in the txt2img workflow."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        gradient = np.linspace(0, 255, 48, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1, 3)
        pixels = np.clip(gradient + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(pictures / f"p{i}.png")
        (pictures / f"p{i}.txt").write_text(f"a noisy gradient number {i}")
    out = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "ldm_nodes", "train", "--data", str(pictures), "--out", str(out), "--resolution",
         "32", "--vae-steps", "2", "--steps", "2", "--save-every", "2", "--batch-size", "2", "--vae-batch-size",
         "2", "--val", "2", "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    name = "ldm_nodes_test_trained_on_folder.safetensors"
    shutil.copy(out / "model.safetensors", server.base / "models" / "ldm" / name)
    kind, data, *_ = asyncio.run(server.run(workflow(REPO / "workflows" / "api" / "txt2img.json", name, 2)))
    assert kind == "execution_success", data


def test_unknown_model_is_refused_by_validation(server):
    async def post():
        async with aiohttp.ClientSession() as s:
            return await server.post(s, "/prompt", {"prompt": workflow(WORKFLOWS[0], "missing.safetensors")})
    status, body = asyncio.run(post())
    assert status == 400
    # LDMLoadModel validates ckpt_name itself (VALIDATE_INPUTS resolves it, so the CLI can take a path),
    # so ComfyUI reports its custom validation, naming the input
    errors = [(e["type"], e["extra_info"].get("input_name")) for e in body["node_errors"]["1"]["errors"]]
    assert errors == [("custom_validation_failed", "ckpt_name")], body


def test_interrupt_stops_a_long_run(server):
    prompt = workflow(REPO / "workflows" / "api" / "txt2img.json", steps=1000)
    kind, data, progress, _, history = asyncio.run(server.run(prompt, interrupt_at=2))
    assert kind == "execution_interrupted", f"{kind}: {data}"
    assert data["node_type"] == "LDMSample" and progress[-1]["value"] < 1000
    assert history["status"]["status_str"] == "error"


def test_free_memory_then_run_again(server):
    async def free():
        async with aiohttp.ClientSession() as s:
            return (await server.post(s, "/free", {"unload_models": True, "free_memory": True}))[0]
    assert asyncio.run(free()) == 200
    time.sleep(1)  # /free only sets flags; the prompt worker acts on them when it is next idle
    loads = server.log().count("Requested to load UNetModel")
    kind, data, *_ = asyncio.run(server.run(workflow(WORKFLOWS[-1], steps=3)))
    assert kind == "execution_success", data
    assert server.log().count("Requested to load UNetModel") > loads, "the model was not loaded again"


def test_the_stand_ins_declare_comfyuis_inputs_and_outputs(server):
    info = asyncio.run(server.get_json("/object_info"))
    for name, cls in STAND_INS.items():
        declared = cls.INPUT_TYPES()
        for category in ("required", "optional"):
            ours = {k: v[0] for k, v in declared.get(category, {}).items()}
            theirs = {k: v[0] for k, v in info[name]["input"].get(category, {}).items()}
            if name == "LoadImage":  # the file list differs: compare the names and their order only
                ours, theirs = list(ours), list(theirs)
            assert ours == theirs, (name, category)
        assert list(cls.RETURN_TYPES) == info[name]["output"], name


def test_core_set_latent_noise_mask_keeps_the_unmasked_region(server):
    """LoadImage (MASK = 1 - alpha) -> LDMEncodeImage -> core's SetLatentNoiseMask -> LDMSample: outside the
    mask the sampled latent is the encoded one (both saved by core's SaveLatent); core's ImageCompositeMasked
    then gives back the original pixels there exactly."""
    from safetensors.torch import load_file

    prompt = workflow(REPO / "workflows" / "api" / "inpaint.json", steps=4)
    prompt["9"]["inputs"] = {"vae": ["1", 2], "image": ["5", 0]}  # no mask here: core's node sets it
    prompt["20"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["9", 0], "mask": ["5", 1]}}
    prompt["6"]["inputs"]["latent"] = ["20", 0]
    prompt["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "inpaint/encoded"}}
    prompt["22"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "inpaint/sampled"}}
    kind, data, _, _, history = asyncio.run(server.run(prompt))
    assert kind == "execution_success", f"{kind}: {data}\n{server.log_tail()}"

    def output(node, key):
        (entry,) = history["outputs"][node][key]
        return server.base / "output" / entry["subfolder"] / entry["filename"]

    encoded = load_file(output("21", "latents"))["latent_tensor"]
    sampled = load_file(output("22", "latents"))["latent_tensor"]
    assert encoded.shape == sampled.shape == (1, 4, 16, 16)  # the tiny model's f = 4
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 0:8] = True  # the picture's mask (rows 16..47, columns 1..32) on the latent grid
    assert torch.equal(sampled[..., ~inside], encoded[..., ~inside])
    assert not torch.equal(sampled[..., inside], encoded[..., inside])
    with Image.open(output("8", "images")) as final, Image.open(REPO / "input" / "inpaint.png") as original:
        final, original = torch.from_numpy(np.asarray(final).copy()), torch.from_numpy(np.asarray(original).copy())
    keep = original[..., 3] == 255
    assert torch.equal(final[keep], original[..., :3][keep])


def core_unet(path):
    """A UNet that core ComfyUI detects as SD2.x (eps): model_channels 320, context 1024, linear
    projections; one level, so 26 M parameters, random weights in fp16."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(4, 4, 320, (1,), 1, (0,), 1, 1024, num_heads=5, use_linear_in_transformer=True))
    save_file({f"model.diffusion_model.{k}": v.half().contiguous() for k, v in unet.state_dict().items()}, path)


def test_sampler_custom_samples_a_core_model_with_our_sampler(server):
    """UNETLoader -> SamplerCustom with LDMSamplerSelect's SAMPLER (LotusConditioning: a fixed 1024-wide
    conditioning, so no text encoder file is needed) -> SaveLatent. Our euler gives core's euler."""
    from safetensors.torch import load_file
    (server.base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    core_unet(server.base / "models" / "diffusion_models" / "ldm_nodes_test_sd2.safetensors")
    latents = {}
    for name, sampler in (("ours_euler", ("LDMSamplerSelect", {"sampler_name": "euler", "eta": -1.0,
                                                               "ddpm_variance": "beta_tilde"})),
                          ("core_euler", ("KSamplerSelect", {"sampler_name": "euler"})),
                          ("ours_ddpm", ("LDMSamplerSelect", {"sampler_name": "ddpm", "eta": -1.0,
                                                              "ddpm_variance": "beta"}))):
        prompt = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "ldm_nodes_test_sd2.safetensors",
                                                         "weight_dtype": "default"}},
            "2": {"class_type": "LotusConditioning", "inputs": {}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": sampler[0], "inputs": sampler[1]},
            "5": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 4,
                                                             "denoise": 1.0}},
            "6": {"class_type": "SamplerCustom", "inputs": {
                "model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": 2.0, "positive": ["2", 0],
                "negative": ["2", 0], "sampler": ["4", 0], "sigmas": ["5", 0], "latent_image": ["3", 0]}},
            "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{name}"}},
        }
        kind, data, _, _, history = asyncio.run(server.run(prompt))
        assert kind == "execution_success", f"{name}: {kind}: {data}\n{server.log_tail()}"
        (saved,) = history["outputs"]["7"]["latents"]
        latents[name] = load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]
    assert latents["ours_euler"].shape == (1, 4, 8, 8) and torch.isfinite(latents["ours_ddpm"]).all()
    torch.testing.assert_close(latents["ours_euler"], latents["core_euler"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents["ours_ddpm"], latents["ours_euler"], atol=1e-2)



# ---------------------------------------------------------------------------------------------
# The real frontend in headless Chromium: the default one of this ComfyUI (1.27.10 for 0.3.64) and, when
# COMFYUI_FRONTEND_ROOT names another (`build.sh DEST 1.58.1` prints it; .ci/run sets it), that one with
# the setting Comfy.VueNodes.Enabled off and on. In each, every workflows/*.json loads, the schedule panel
# draws on its LDMNoiseSchedule nodes, and the graph is queued and its image comes back.

FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT")
BROWSER_TIMEOUT = 180
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over the DevTools protocol with aiohttp's websocket (no npm, no driver).
    Keeps the page's uncaught exceptions (`errors`, what Playwright calls pageerror)."""

    def __init__(self, profile):
        self.profile = profile
        self.errors, self.events, self._calls, self._next = [], {}, {}, 0

    async def __aenter__(self):
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--window-size=1600,1000", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(600):
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc):
        self.reader.cancel()
        await self.ws.close()
        await self.session.close()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self._calls.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.errors.append((details.get("exception") or {}).get("description") or details.get("text"))

    async def call(self, method, **params):
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._calls[self._next] = future
        await self.ws.send_json({"id": self._next, "method": method, "params": params})
        reply = await asyncio.wait_for(future, BROWSER_TIMEOUT)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    async def evaluate(self, expression):
        """The value of a JS expression (a promise is awaited); its exception fails the test."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError((details.get("exception") or {}).get("description") or details.get("text"))
        return result["result"].get("value")


BROWSER_RUN = r"""
(async (workflow) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const { app } = window.comfyAPI.app, { api } = window.comfyAPI.api;
  await app.loadGraphData(structuredClone(workflow));
  for (const node of app.graph.nodes) {  // a short run: few steps, likelihood strided
    const steps = node.widgets?.find((w) => w.name === "steps");
    if (node.type === "LDMNoiseSchedule") steps.value = 3;
    if (node.type === "LDMLikelihood") steps.value = 4;
  }
  const schedules = app.graph.nodes.filter((n) => n.type === "LDMNoiseSchedule");
  const drawnPixels = (canvas) => {  // pixels off the background colour (the top-left one)
    if (!canvas.isConnected || !canvas.clientWidth) return 0;
    const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    let drawn = 0;
    for (let i = 0; i < data.length; i += 4)
      if (Math.abs(data[i] - data[0]) + Math.abs(data[i + 1] - data[1]) + Math.abs(data[i + 2] - data[2]) > 60) drawn++;
    return drawn;
  };
  const panels = [];
  for (const node of schedules) {
    let panel = node.ldmSchedulePanel, drawn = 0;
    const ready = () => panel?.series && (drawn = drawnPixels(panel.canvas)) > 300;
    for (let waited = 0; !ready() && waited < 20000; waited += 100) {
      await sleep(100);
      panel = node.ldmSchedulePanel;
    }
    panels.push({ attached: !!panel, inPage: !!panel?.canvas.isConnected, message: panel?.message ?? null,
                  series: panel?.series?.length ?? 0, drawn });
  }
  const images = [];
  const onExecuted = (e) => images.push(...(e.detail?.output?.images ?? []));
  let end = null;
  const onEnd = (kind) => (e) => { end = { kind, detail: e.detail }; };
  const handlers = [["executed", onExecuted], ["execution_success", onEnd("success")],
                    ["execution_error", onEnd("error")], ["execution_interrupted", onEnd("interrupted")]];
  for (const [name, handler] of handlers) api.addEventListener(name, handler);
  try {
    await app.queuePrompt(0, 1);
    for (let waited = 0; !end && waited < 150000; waited += 100) await sleep(100);
  } finally {
    for (const [name, handler] of handlers) api.removeEventListener(name, handler);
  }
  const back = [];
  for (const image of images) {
    const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
    const response = await api.fetchApi(`/view?${query}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    back.push({ status: response.status, png: bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47 });
  }
  return { panels, end: end && { kind: end.kind, message: end.detail?.exception_message ?? null }, back };
})
"""


async def browse(server, profile, vue_nodes=None):
    """Open the server's frontend and run every UI workflow in it; ({workflow: result}, page errors)."""
    async with aiohttp.ClientSession() as s:
        settings = {"Comfy.TutorialCompleted": True}
        if vue_nodes is not None:
            settings["Comfy.VueNodes.Enabled"] = vue_nodes
        async with s.post(f"{server.url}/settings", json=settings) as r:
            assert r.status == 200, await r.text()
    results = {}
    async with Chromium(profile) as browser:
        await browser.call("Page.navigate", url=server.url)
        for _ in range(BROWSER_TIMEOUT * 10):
            # window.app is set once the app and its canvas are set up (earlier, loading a graph fails in 1.58.1)
            ready = await browser.evaluate("!!(window.app?.canvas && window.app.graph "
                                           "&& window.LiteGraph?.registered_node_types?.LDMSample)")
            if ready:
                break
            await asyncio.sleep(0.1)
        assert ready, f"the frontend did not start: {browser.errors}"
        # Frontend 1.27.10 throws "Cannot read properties of undefined (reading 'id')" once while it starts,
        # with no custom node installed too (Comfy.Canvas.NavigationMode's onChange sets settings that are
        # not registered yet): not the pack's. What counts is what happens once the workflows load.
        browser.errors.clear()
        version = await browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        for path in UI_WORKFLOWS:
            results[path.stem] = await browser.evaluate(f"{BROWSER_RUN}({path.read_text()})")
        return version, results, browser.errors


def check_browser_results(server, version, results, errors):
    assert set(results) == {p.stem for p in UI_WORKFLOWS}
    for name, result in results.items():
        assert result["end"] == {"kind": "success", "message": None}, (version, name, result, server.log_tail())
        assert result["back"] and all(b == {"status": 200, "png": True} for b in result["back"]), \
            (version, name, result)
        expected = sum(n["type"] == "LDMNoiseSchedule" for n in json.loads((REPO / "workflows" / f"{name}.json")
                                                                            .read_text())["nodes"])
        assert len(result["panels"]) == expected, (version, name, result)
        for panel in result["panels"]:
            assert panel["attached"] and panel["inPage"] and panel["message"] is None, (version, name, panel)
            assert panel["series"] >= 1 and panel["drawn"] > 300, (version, name, panel)
    assert not errors, (version, errors)


@pytest.fixture(scope="module")
def browser_profile(tmp_path_factory):
    if chromium() is None:
        pytest.skip("no chromium binary (CI installs Debian's chromium package)")
    return tmp_path_factory.mktemp("chromium")


def test_every_ui_workflow_runs_in_the_default_frontend(server, browser_profile):
    version, results, errors = asyncio.run(browse(server, browser_profile / "default"))
    check_browser_results(server, version, results, errors)


@pytest.fixture(scope="module")
def server_with_other_frontend(tmp_path_factory):
    if not FRONTEND_ROOT:
        pytest.skip("COMFYUI_FRONTEND_ROOT is not set (build.sh DEST 1.58.1 prints it)")
    srv = Server(tmp_path_factory.mktemp("comfyui_frontend"), FRONTEND_ROOT)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("vue_nodes", [False, True], ids=["litegraph_nodes", "vue_nodes"])
def test_every_ui_workflow_runs_in_the_newer_frontend(server_with_other_frontend, browser_profile, vue_nodes):
    version, results, errors = asyncio.run(browse(server_with_other_frontend, browser_profile / f"vue_{vue_nodes}",
                                                  vue_nodes))
    check_browser_results(server_with_other_frontend, version, results, errors)

# comfy_host.ComfyHost, the nodes' host inside ComfyUI, against ComfyUI's own modules (not a stub): run in
# COMFYUI_PYTHON with the checkout on sys.path and `--cpu`, as the server runs. Imported through the pack's
# public path (ldm_nodes.nodes.comfy_host).
COMFY_HOST_CHECK = """
import sys
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [{pack!r}, {comfy!r}]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_management as mm
import comfy.model_patcher
import comfy.samplers
import comfy.utils
from ldm_nodes.nodes.comfy_host import ComfyHost
from ldm_nodes.nodes import host as nodes_host

h = ComfyHost()
assert h.inside_comfyui
assert h.device() == mm.get_torch_device() == torch.device("cpu"), h.device()

# managed / use: the module goes to ComfyUI's memory manager and comes back loaded
module = torch.nn.Linear(3, 2)
handle = h.managed(module)
assert isinstance(handle, comfy.model_patcher.ModelPatcher) and handle.model is module
assert h.use(handle) is module and handle in mm.loaded_models(), mm.loaded_models()

# progress: ComfyUI's ProgressBar hook sees each step, with a JPEG preview when given one
seen = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, preview)))
progress = h.progress(4)
progress.update(1)
picture = object()
progress.update(2, picture)
assert seen == [(1, 4, None), (2, 4, ("JPEG", picture, 512))], seen

# interruption: the next progress update raises ComfyUI's own exception
mm.interrupt_current_processing(True)
try:
    progress.update(3)
except mm.InterruptProcessingException:
    pass
else:
    raise AssertionError("an interrupted run went on")
mm.interrupt_current_processing(False)

# sampler: ComfyUI's KSAMPLER around the sampling function
def function(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return x
sampler = h.sampler(function)
assert isinstance(sampler, comfy.samplers.KSAMPLER) and sampler.sampler_function is function

# the pack's entry configured this host when it was imported inside ComfyUI
import ldm_nodes
assert nodes_host.in_comfyui() and isinstance(nodes_host.current(), ComfyHost), nodes_host.current()
print("comfy_host ok")
"""


def test_comfy_host_against_comfyuis_own_modules(tmp_path):
    link = tmp_path / "pack"
    link.mkdir()
    os.symlink(REPO, link / PACK_LINK, target_is_directory=True)
    script = COMFY_HOST_CHECK.format(pack=str(link), comfy=str(COMFY))
    result = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "comfy_host ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


# LDMComfyLikelihood under models core ComfyUI detects and loads itself (issue #29, part 2), in a process of
# COMFYUI_PYTHON as above. Random weights (every parameter N(0, 0.02^2), fp16 in the files), one 64x64 image,
# a random conditioning tensor of each family's width, 20 strided timesteps:
# - SD1.x (one-level UNet, SD's VAE, CLIP-L): the same file loaded by the pack (core.checkpoint) gives the
#   same bound through pipeline.likelihood, and both autoencoders the same latent; its inpainting twin
#   (9 input channels), which core would score without a word, is refused;
# - SD2.x v-prediction (four levels, so output_blocks.11.1 exists and core detects v from its norm's bias):
#   the bound equals variational_bound on the pack's UNet holding those weights, read as v (not as eps);
# - SDXL-shaped (Segmind Vega's depths at one width, core's own UNet class; pooled output and sizes in the
#   conditioning): the bound equals variational_bound on core's diffusion model called directly with the
#   conditioning's label vector, read as eps.
# The oracles compute the schedule from its betas (pack TrainingSchedule, float64), not from core's sigmas.
COMFY_BOUND_CHECK = """
import sys
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [{pack!r}, {comfy!r}]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import save_file
import comfy.model_base
import comfy.model_sampling
import comfy.sd
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel as CoreUNet
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.classify import classify, encode_candidates
from ldm_nodes.core.errors import InputError
from ldm_nodes.core.likelihood import variational_bound
from ldm_nodes.core.pipeline import DiffusionModel, TextEncoder, likelihood
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.nodes.classify import LDMComfyClassify
from ldm_nodes.nodes.likelihood import LDMComfyLikelihood

folder = {folder!r}
STEPS, SEED = 20, 0
image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))

def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()

def write(name, parts):
    path = f"{{folder}}/{{name}}.safetensors"
    save_file({{prefix + k: v.half().contiguous() for prefix, module in parts.items()
               for k, v in module.state_dict().items() if not k.endswith("position_ids")}}, path)
    return path

def core_load(path):
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=False)
    return model, vae

def node_bound(model, vae, conditioning):
    nll, plot = LDMComfyLikelihood().score(model, vae, image, conditioning, "beta_tilde", STEPS)
    assert plot.shape == (1, 400, 640, 3) and torch.isfinite(torch.tensor(nll)), (plot.shape, nll)
    return nll

def oracle(network, x0, prediction, context):
    return float(variational_bound(network, x0, TrainingSchedule(), prediction, context, discrete=False,
                                   timesteps=STEPS, generator=torch.Generator().manual_seed(SEED)).total.mean())

def close(a, b, what):
    assert abs(a - b) <= 1e-4 * abs(b) + 1e-6, f"{{what}}: {{a}} against {{b}}"

vae = randomise(AutoencoderKL(AutoencoderConfig()), 10)  # SD's autoencoder, the layout core builds for SD files

# SD1.x: the pack's own bound of the same file
unet = randomise(UNetModel(UNetConfig(4, 4, 320, (1,), 1, (0,), 1, 768, num_heads=8)), 11)
sd1 = write("sd1", {{"model.diffusion_model.": unet, "first_stage_model.": vae,
                    "cond_stage_model.transformer.": randomise(CLIPTextModel(CLIPTextConfig()), 12)}})
model, clip, core_vae, _ = comfy.sd.load_checkpoint_guess_config(sd1, output_vae=True, output_clip=True)
assert type(model.model) is comfy.model_base.BaseModel and type(model.model.model_config).__name__ == "SD15"
context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
ours = load_checkpoint(sd1)
pack_model = DiffusionModel.from_checkpoint(ours)
with torch.no_grad():
    z_core = core_vae.encode(image) * 0.18215
    z_pack = ours.vae.encode(image.movedim(-1, 1) * 2 - 1).mode() * 0.18215
torch.testing.assert_close(z_core, z_pack, rtol=1e-4, atol=1e-4)
pack = float(likelihood(pack_model, ours.vae, image, context, "beta_tilde", STEPS, SEED).total.mean())
sd1_nll = node_bound(model, core_vae, [[context, {{}}]])
close(sd1_nll, pack, "SD1.x against the pack's own bound")
other = node_bound(model, core_vae, [[torch.randn(1, 77, 768), {{}}]])
assert abs(other - sd1_nll) > 1e-6, "the conditioning does not reach the model"

# an SD1.x inpainting UNet (9 input channels) is refused, naming the model, as LDMLikelihood refuses the pack's
inpaint = write("sd1_inpaint", {{"model.diffusion_model.": randomise(UNetModel(UNetConfig(
    9, 4, 320, (1,), 1, (0,), 1, 768, num_heads=8)), 15), "first_stage_model.": vae}})
inpaint_model, inpaint_vae = core_load(inpaint)
assert inpaint_model.model.model_config.inpaint_model()
try:
    node_bound(inpaint_model, inpaint_vae, [[context, {{}}]])
except InputError as e:
    assert str(e).startswith("model: is an inpainting"), e
else:
    raise AssertionError("an inpainting model was scored")
# steps outside 0 and 2..T-1 are refused before the VAE or the CLIP does any work
class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"{{name}} used before steps were checked")

for bad in (lambda: LDMComfyLikelihood().score(model, Untouchable(), image, [[context, {{}}]], "beta_tilde", 1000),
            lambda: LDMComfyClassify().classify(image, model, Untouchable(), Untouchable(), "a\\nb", 1, 3)):
    try:
        bad()
    except ValueError as e:
        assert str(e).startswith("steps: 0 (all 1000 timesteps)"), e
    else:
        raise AssertionError("steps out of range were taken")
# classification: core's CLIP encodes as the pack's text encoder does, and LDMComfyClassify (candidate by
# candidate through core's sampling) ranks and scores as the pack's LDMClassify (one batch) on the same file
prompts = ["a red circle", "a blue square", "a green triangle on a white background"]
contexts = encode_candidates(TextEncoder(ours.text_encoder, CLIPTokenizer()), prompts)
core_context = clip.encode_from_tokens_scheduled(clip.tokenize(prompts[0]))[0][0]
torch.testing.assert_close(core_context, contexts[:1], rtol=1e-4, atol=1e-4)
expected = classify(pack_model, ours.vae, image, contexts, 8, 3)
progress = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append((value, total)))
best, plot = LDMComfyClassify().classify(image, model, clip, core_vae, "\\n".join(prompts), 8, 3)
assert best == prompts[expected.ranking[0]] and plot.shape == (1, 400, 640, 3), (best, plot.shape)
assert progress[-1][0] == progress[-1][1] and len(progress) >= 3, progress

# SD2.x v-prediction: detected by core, read as v
unet = randomise(UNetModel(UNetConfig(4, 4, 320, (1, 1, 1, 1), 2, (0, 1, 2), 1, 1024, num_head_channels=64,
                                      use_linear_in_transformer=True)), 13)
with torch.no_grad():
    bias = unet.state_dict()["output_blocks.11.1.transformer_blocks.0.norm1.bias"]
    bias.normal_(0, 1, generator=torch.Generator().manual_seed(6))
sd2 = write("sd2v", {{"model.diffusion_model.": unet, "first_stage_model.": vae}})
model, core_vae = core_load(sd2)
assert type(model.model.model_config).__name__ == "SD20"
assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
context = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    x0 = core_vae.encode(image) * 0.18215
net = lambda x, t, c: unet(x, t, c)
sd2_nll = node_bound(model, core_vae, [[context, {{}}]])
close(sd2_nll, oracle(net, x0, "v", context), "SD2.x v against the UNet read as v")
assert abs(sd2_nll - oracle(net, x0, "eps", context)) > 1e-3 * abs(sd2_nll), "v read as eps"

# SDXL-shaped: core's own UNet class, the label vector from the conditioning's pooled output and sizes
config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
              channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1, 1, 2, 2],
              transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=-1,
              use_linear_in_transformer=True, context_dim=2048, num_head_channels=64, adm_in_channels=2816,
              num_classes="sequential", use_spatial_transformer=True, legacy=False, use_checkpoint=False,
              use_temporal_attention=False, use_temporal_resblock=False)
xl_unet = randomise(CoreUNet(**config), 14)
sdxl = write("sdxl", {{"model.diffusion_model.": xl_unet, "first_stage_model.": vae}})
model, core_vae = core_load(sdxl)
assert isinstance(model.model, comfy.model_base.SDXL), type(model.model)
context = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(4))
pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(5))
extra = {{"pooled_output": pooled, "width": 64, "height": 64}}
with torch.no_grad():
    x0 = core_vae.encode(image) * 0.13025
    y = model.model.encode_adm(**extra)
    xl_net = lambda x, t, c: xl_unet(x, t, context=c, y=y.expand(len(x), -1))
xl_nll = node_bound(model, core_vae, [[context, extra]])
close(xl_nll, oracle(xl_net, x0, "eps", context), "SDXL against core's UNet called directly")
print("bounds ok", sd1_nll, sd2_nll, xl_nll)
"""


def test_the_bound_under_models_core_comfyui_loads(tmp_path):
    link = tmp_path / "pack"
    link.mkdir()
    os.symlink(REPO, link / PACK_LINK, target_is_directory=True)
    script = COMFY_BOUND_CHECK.format(pack=str(link), comfy=str(COMFY), folder=str(tmp_path))
    result = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "bounds ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
