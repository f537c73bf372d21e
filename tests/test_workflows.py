"""The shipped workflows: each API file runs headless, and each UI file is the same graph as its API twin."""
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_nodes
from ldm_nodes.headless import runner
from ldm_nodes.nodes import model_paths
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.data import parse_caption
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

PACK = Path(ldm_nodes.__file__).resolve().parent
WORKFLOWS = PACK / "workflows"
INPUT = PACK / "input"
NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
REGISTRY = runner.default_registry()
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}



def api(name):
    return runner.load_workflow(WORKFLOWS / "api" / f"{name}.json")


def ui(name):
    return runner.read_json(WORKFLOWS / f"{name}.json")


def is_ui_format(data):
    return isinstance(data, dict) and "nodes" in data and "links" in data


def test_the_shipped_workflows():
    assert {"txt2img", "img2img", "schedule_comparison", "inpaint", "likelihood", "classify", "trajectory"} <= set(NAMES)
    assert nodes_of(api("likelihood"), "LDMLikelihood")


def test_ui_files_sit_one_level_deep_beside_their_api_twins():
    """ComfyUI's Templates menu lists <pack>/workflows/*.json only; API files live in workflows/api/."""
    for path in WORKFLOWS.rglob("*.json"):
        data = runner.read_json(path)
        if is_ui_format(data):
            assert path.parent == WORKFLOWS, f"{path.relative_to(PACK)}: UI workflows must sit directly in workflows/"
        else:
            assert path.parent == WORKFLOWS / "api", f"{path.relative_to(PACK)}: API workflows belong in workflows/api/"
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == NAMES


def test_the_workflows_are_package_data():
    """A non-editable install must carry every shipped workflow (pyproject's package-data)."""
    config = tomllib.loads((PACK / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["ldm_nodes"]
    shipped = {path for pattern in patterns for path in PACK.glob(pattern)}
    for path in sorted(WORKFLOWS.rglob("*.json")):
        assert path in shipped, f"{path.relative_to(PACK)} matches none of the package-data patterns {patterns}"


# ---------------------------------------------------------------------------------------------
# The UI files declare what the nodes declare


def declared_inputs(cls):
    """[(name, type, options, category)] in INPUT_TYPES order, required then optional."""
    types = cls.INPUT_TYPES()
    return [(name, spec[0], spec[1] if len(spec) > 1 else {}, category)
            for category in ("required", "optional") for name, spec in types.get(category, {}).items()]


def is_widget(kind):
    return isinstance(kind, list) or kind in WIDGET_TYPES


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_seeds_are_fixed(name):
    """The frontend stores a control_after_generate value right after each seed's value: ship "fixed".
    (tests/test_ui_workflow.py checks that each UI file converts to exactly its API twin.)"""
    for node in ui(name)["nodes"]:
        widgets = [n for n, kind, _, _ in declared_inputs(REGISTRY[node["type"]]) if is_widget(kind)]
        if "seed" in widgets:
            assert node["widgets_values"][widgets.index("seed") + 1] == "fixed", f"node {node['id']}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_link_and_output_types_match_the_nodes(name):
    graph = ui(name)
    nodes = {node["id"]: node for node in graph["nodes"]}
    for node in graph["nodes"]:
        cls = REGISTRY[node["type"]]
        outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        assert outputs == list(zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), cls.RETURN_TYPES)), node["id"]
    for link_id, source, slot, target, target_slot, kind in graph["links"]:
        assert kind == REGISTRY[nodes[source]["type"]].RETURN_TYPES[slot], f"link {link_id}"
        entry = nodes[target]["inputs"][target_slot]
        assert entry["type"] == kind, f"link {link_id} into {entry['name']}"
        declared = {n: k for n, k, _, _ in declared_inputs(REGISTRY[nodes[target]["type"]])}
        assert declared[entry["name"]] == kind, f"link {link_id}: {entry['name']} takes {declared[entry['name']]}"



# ---------------------------------------------------------------------------------------------
# What the API workflows name


def nodes_of(prompt, class_type):
    return {node_id: node for node_id, node in prompt.items() if node["class_type"] == class_type}


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_uses_a_builtin_model_and_a_dataset_caption(name):
    prompt = api(name)
    loaders = nodes_of(prompt, "LDMLoadModel")
    assert loaders and all(n["inputs"]["ckpt_name"].startswith("builtin/") for n in loaders.values())
    for encode in nodes_of(prompt, "LDMEncodeText").values():
        if encode["inputs"]["text"]:
            parse_caption(encode["inputs"]["text"])  # raises on a caption outside the dataset's grammar
    for sample in nodes_of(prompt, "LDMSample").values():
        positive = prompt[sample["inputs"]["positive"][0]]
        negative = prompt[sample["inputs"]["negative"][0]]
        assert positive["class_type"] == negative["class_type"] == "LDMEncodeText"
        parse_caption(positive["inputs"]["text"])  # raises on a caption outside the dataset's grammar
        assert negative["inputs"]["text"] == ""  # what caption dropout trained


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_names_a_shipped_builtin_model(name):
    if not model_paths.builtin_models():
        pytest.skip("models/ holds no built-in model yet")
    for loader in nodes_of(api(name), "LDMLoadModel").values():
        assert loader["inputs"]["ckpt_name"] in model_paths.builtin_models()


def test_example_input_image():
    with Image.open(INPUT / "shapes.png") as image:
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    with Image.open(INPUT / "inpaint.png") as image:  # the inpaint workflow's: its transparent pixels are the mask
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGBA"
        assert 0 < (np.asarray(image)[..., 3] == 0).mean() < 0.5


# ---------------------------------------------------------------------------------------------
# Every API workflow runs headless


UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 64, num_heads=2)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.5)
TEXT = CLIPTextConfig(vocab_size=49408, width=64, layers=1, heads=2, mlp_width=128)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    modules = UNetModel(UNET), AutoencoderKL(VAE), CLIPTextModel(TEXT)
    for m in modules:
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    ck.save_checkpoint(path, *modules, TrainingSchedule("scaled_linear", 1000), "eps")
    return path


@pytest.fixture
def models_dir(tmp_path, tiny_file):
    saved = list(model_paths._model_dirs)
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_file, folder / "tiny.safetensors")
    model_paths.set_model_dirs([folder])
    yield folder
    model_paths.set_model_dirs(saved)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_headless(name, models_dir, tmp_path):
    prompt = api(name)
    overrides = [f"{node_id}.ckpt_name=tiny.safetensors" for node_id in nodes_of(prompt, "LDMLoadModel")]
    prompt = runner.apply_overrides(prompt, overrides)
    out = tmp_path / "out"
    written = runner.run(prompt, out_dir=out, input_dir=INPUT, workflow=ui(name))
    saves = nodes_of(prompt, "SaveImage")
    assert saves
    frames = {"ldm_trajectory": 10}  # the trajectory's save: one image per sampling step
    expected = {out / f"{prefix}_{k:05}_.png" for prefix in (node["inputs"]["filename_prefix"] for node in saves.values())
                for k in range(1, frames.get(prefix, 1) + 1)}
    assert sorted(map(Path, written)) == sorted(expected)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(expected)
    pixels = []
    for path in sorted(expected):
        with Image.open(path) as image:
            assert image.size == ((640, 400) if name in ("likelihood", "classify") else (64, 64)) and image.mode == "RGB"
            assert json.loads(image.info["prompt"]) == prompt
            assert json.loads(image.info["workflow"]) == ui(name)
            pixels.append(torch.from_numpy(np.asarray(image).copy()))
    if len(pixels) > 1:  # the schedule comparison: one seed, two schedules, two different images
        assert not torch.equal(pixels[0], pixels[1])
