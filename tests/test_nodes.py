"""The node layer: the saved-workflow contract (ARCHITECTURE.md section 2), model names, the loader
and its cache, and text-to-image / image-to-image end to end through the node classes."""
import ast
import gc
import inspect
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import ldm_nodes
from ldm_nodes.nodes import model_paths
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.pipeline import ScheduleSpec
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.nodes import loader
from ldm_nodes.nodes import (
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, LDMDecodeLatent, LDMEmptyLatent, LDMEncodeImage,
    LDMCompileModel, LDMEncodeText, LDMLoadModel, LDMNoiseSchedule, LDMSample,
)

PACK = Path(ldm_nodes.__file__).resolve().parent



# ---------------------------------------------------------------------------------------------
# The contract, written out from ARCHITECTURE.md section 2. Saved workflows are positional, so
# names, their order and option values may only be appended to, never renamed or reordered.

COMBO = "COMBO"  # a list of options that is not pinned (the model files found)
BETA_SCHEDULES = ["model", "linear", "scaled_linear", "cosine"]
SPACINGS = ["leading", "trailing", "linspace", "karras", "exponential"]
SAMPLER_NAMES = ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "plms"]
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
DDPM_VARIANCES = ["beta_tilde", "beta"]

CONTRACT = {
    "LDMLoadModel": {
        "required": [("ckpt_name", COMBO), ("precision", PRECISIONS)],
        "optional": [],
        "outputs": [("model", "LDM_MODEL"), ("text_encoder", "LDM_TEXT_ENCODER"), ("vae", "LDM_VAE")],
    },
    "LDMEncodeText": {
        "required": [("text_encoder", "LDM_TEXT_ENCODER"), ("text", "STRING")],
        "optional": [],
        "outputs": [("conditioning", "LDM_CONDITIONING")],
    },
    "LDMNoiseSchedule": {
        "required": [("beta_schedule", BETA_SCHEDULES), ("steps", "INT"), ("spacing", SPACINGS),
                     ("zero_terminal_snr", "BOOLEAN")],
        "optional": [("model", "LDM_MODEL")],
        "outputs": [("schedule", "LDM_SCHEDULE"), ("sigmas", "SIGMAS")],
    },
    "LDMEmptyLatent": {
        "required": [("vae", "LDM_VAE"), ("width", "INT"), ("height", "INT"), ("batch_size", "INT")],
        "optional": [],
        "outputs": [("LATENT", "LATENT")],
    },
    "LDMEncodeImage": {
        "required": [("vae", "LDM_VAE"), ("image", "IMAGE")],
        "optional": [],
        "outputs": [("LATENT", "LATENT")],
    },
    "LDMSample": {
        "required": [("model", "LDM_MODEL"), ("schedule", "LDM_SCHEDULE"), ("positive", "LDM_CONDITIONING"),
                     ("negative", "LDM_CONDITIONING"), ("latent", "LATENT"), ("seed", "INT"),
                     ("sampler_name", SAMPLER_NAMES), ("cfg", "FLOAT"), ("denoise", "FLOAT")],
        "optional": [("sigmas", "SIGMAS"), ("eta", "FLOAT"), ("guidance_rescale", "FLOAT"),
                     ("ddpm_variance", DDPM_VARIANCES)],
        "outputs": [("LATENT", "LATENT")],
    },
    "LDMDecodeLatent": {
        "required": [("vae", "LDM_VAE"), ("samples", "LATENT")],
        "optional": [],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "LDMLikelihood": {
        "required": [("model", "LDM_MODEL"), ("vae", "LDM_VAE"), ("image", "IMAGE"), ("variance", DDPM_VARIANCES),
                     ("steps", "INT")],
        "optional": [("conditioning", "LDM_CONDITIONING")],
        "outputs": [("nll", "FLOAT"), ("plot", "IMAGE")],
    },
    "LDMSamplerSelect": {
        "required": [("sampler_name", SAMPLER_NAMES), ("eta", "FLOAT"), ("ddpm_variance", DDPM_VARIANCES)],
        "optional": [],
        "outputs": [("SAMPLER", "SAMPLER")],
    },
    "LDMClassify": {
        "required": [("image", "IMAGE"), ("model", "LDM_MODEL"), ("text_encoder", "LDM_TEXT_ENCODER"),
                     ("vae", "LDM_VAE"), ("prompts", "STRING"), ("steps", "INT"), ("seed", "INT")],
        "optional": [],
        "outputs": [("best_prompt", "STRING"), ("plot", "IMAGE")],
    },
    "LDMComfyLikelihood": {
        "required": [("model", "MODEL"), ("vae", "VAE"), ("image", "IMAGE"), ("conditioning", "CONDITIONING"),
                     ("variance", DDPM_VARIANCES), ("steps", "INT")],
        "optional": [],
        "outputs": [("nll", "FLOAT"), ("plot", "IMAGE")],
    },
    "LDMComfyClassify": {
        "required": [("image", "IMAGE"), ("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("prompts", "STRING"),
                     ("steps", "INT"), ("seed", "INT")],
        "optional": [],
        "outputs": [("best_prompt", "STRING"), ("plot", "IMAGE")],
    },
    "LDMCompileModel": {
        "required": [("model", "LDM_MODEL")],
        "optional": [],
        "outputs": [("model", "LDM_MODEL")],
    },
}


def declared(cls, category):
    return [(name, spec[0], spec[1] if len(spec) > 1 else {}) for name, spec in cls.INPUT_TYPES().get(category, {}).items()]


def check_type(node, name, kind, pinned):
    where = f"{node}.{name}"
    if pinned == COMBO:
        assert isinstance(kind, list), f"{where} must be a COMBO"
    elif isinstance(pinned, list):
        assert isinstance(kind, list), f"{where} must be a COMBO"
        assert kind[:len(pinned)] == pinned, f"{where}: options {kind} must start with {pinned} (append only)"
    else:
        assert kind == pinned, f"{where} has type {kind!r}, the contract says {pinned!r}"


@pytest.mark.parametrize("node", list(CONTRACT))
def test_contract_inputs_outputs_and_options(node):
    cls, pinned = NODE_CLASS_MAPPINGS[node], CONTRACT[node]
    required, optional = declared(cls, "required"), declared(cls, "optional")
    # no new required input (old API workflows would miss it); new optional inputs only after the pinned ones
    assert [n for n, _, _ in required] == [n for n, _ in pinned["required"]], f"{node}: required inputs"
    assert [n for n, _, _ in optional][:len(pinned["optional"])] == [n for n, _ in pinned["optional"]], \
        f"{node}: optional inputs"
    for (name, kind, _), (_, kind_pinned) in zip(required + optional, pinned["required"] + pinned["optional"]):
        check_type(node, name, kind, kind_pinned)
    names = list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
    assert len(names) == len(cls.RETURN_TYPES)
    assert list(zip(names, cls.RETURN_TYPES))[:len(pinned["outputs"])] == pinned["outputs"], f"{node}: outputs"


def test_the_pack_registers_exactly_the_contract_nodes():
    assert list(NODE_CLASS_MAPPINGS) == list(CONTRACT)
    assert ldm_nodes.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert ldm_nodes.NODE_DISPLAY_NAME_MAPPINGS is NODE_DISPLAY_NAME_MAPPINGS
    assert ldm_nodes.WEB_DIRECTORY == "./web" and (PACK / "web").is_dir()


def spec_of(node, name):
    specs = {n: (k, o) for category in ("required", "optional") for n, k, o in declared(NODE_CLASS_MAPPINGS[node], category)}
    return specs[name]


def test_contract_defaults_and_ranges():
    assert spec_of("LDMNoiseSchedule", "beta_schedule")[1]["default"] == "model"
    assert spec_of("LDMLoadModel", "precision")[1]["default"] == "auto"
    seed = spec_of("LDMSample", "seed")[1]
    assert (seed["min"], seed["max"], seed["control_after_generate"]) == (0, 2**64 - 1, True)
    denoise = spec_of("LDMSample", "denoise")[1]
    assert (denoise["default"], denoise["min"], denoise["max"]) == (1.0, 0.0, 1.0)
    eta = spec_of("LDMSample", "eta")[1]
    assert (eta["default"], eta["min"]) == (-1.0, -1.0)
    rescale = spec_of("LDMSample", "guidance_rescale")[1]
    assert (rescale["default"], rescale["min"], rescale["max"]) == (0.0, 0.0, 1.0)
    assert spec_of("LDMSample", "ddpm_variance")[1]["default"] == "beta_tilde"
    assert spec_of("LDMNoiseSchedule", "zero_terminal_snr")[1]["default"] is False


@pytest.mark.parametrize("node", list(CONTRACT))
def test_widget_defaults_are_valid_and_optional_ones_match_the_function(node):
    """An API workflow may omit an optional input: the function's default must then be the widget's."""
    cls = NODE_CLASS_MAPPINGS[node]
    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for category in ("required", "optional"):
        for name, kind, options in declared(cls, category):
            assert name in parameters, f"{node}.{cls.FUNCTION} does not take {name}"
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind, f"{node}.{name}"
            if kind in ("INT", "FLOAT"):
                assert options.get("min", -math_inf()) <= options["default"] <= options.get("max", math_inf()), f"{node}.{name}"
            if category == "optional":
                default = parameters[name].default
                assert default is not inspect.Parameter.empty, f"{node}.{name} is optional but has no default"
                assert default == options.get("default"), f"{node}.{name}: function default {default!r}"
            else:
                assert parameters[name].default is inspect.Parameter.empty, f"{node}.{name} is required"


def math_inf():
    return float("inf")


@pytest.mark.parametrize("node", list(CONTRACT))
def test_every_node_and_input_is_documented(node):
    cls = NODE_CLASS_MAPPINGS[node]
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert cls.CATEGORY == "latent diffusion"
    assert isinstance(NODE_DISPLAY_NAME_MAPPINGS.get(node), str) and NODE_DISPLAY_NAME_MAPPINGS[node]
    assert callable(getattr(cls, cls.FUNCTION))
    for category in ("required", "optional"):
        for name, _, options in declared(cls, category):
            assert isinstance(options.get("tooltip"), str) and options["tooltip"].strip(), f"{node}.{name}"
    tips = getattr(cls, "OUTPUT_TOOLTIPS", ())
    assert len(tips) == len(cls.RETURN_TYPES) and all(isinstance(t, str) and t.strip() for t in tips)
    for kind in cls.RETURN_TYPES:
        assert kind in ("LATENT", "IMAGE", "SIGMAS", "SAMPLER", "FLOAT", "STRING") or kind.startswith("LDM_"), \
            f"{node} returns {kind}"


def test_display_names_cover_every_node_and_are_distinct():
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_DISPLAY_NAME_MAPPINGS)


HOST_MODULES = {"comfy", "server", "folder_paths", "nodes", "execution", "comfy_extras"}


def test_the_pack_imports_without_comfyui(tmp_path):
    """Imports with ComfyUI's modules made unimportable; none of them is left in sys.modules."""
    code = f"""
import sys
HOST = {sorted(HOST_MODULES)!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in HOST:
            raise ImportError('no ' + name)
sys.meta_path.insert(0, Block())
import ldm_nodes, ldm_nodes.headless.runner, ldm_nodes.nodes.routes
from ldm_nodes.nodes import host
assert not host.in_comfyui()
assert len(ldm_nodes.NODE_CLASS_MAPPINGS) == {len(CONTRACT)}
left = sorted(m for m in sys.modules if m.split('.')[0] in HOST)
assert not left, left
print('imported')
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr


def test_core_never_imports_the_host_or_the_nodes():
    for path in sorted((PACK / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside core/"
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in HOST_MODULES | {"ldm_nodes"}, f"{path.name} imports {name}"


# ---------------------------------------------------------------------------------------------
# A tiny random model in a model folder

UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 64, num_heads=2)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.5)
TEXT = CLIPTextConfig(vocab_size=49408, width=64, layers=1, heads=2, mlp_width=128)


def save_tiny_model(path, seed=0):
    torch.manual_seed(seed)
    modules = UNetModel(UNET), AutoencoderKL(VAE), CLIPTextModel(TEXT)
    for m in modules:  # zero-initialised output layers would make every image the same
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
    ck.save_checkpoint(path, *modules, TrainingSchedule("scaled_linear", 1000), "eps")
    return path


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture
def restore_model_dirs():
    saved = list(model_paths._model_dirs)
    yield
    model_paths.set_model_dirs(saved)


@pytest.fixture
def models_dir(tmp_path, tiny_file, restore_model_dirs):
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(tiny_file, folder / "tiny.safetensors")
    model_paths.set_model_dirs([folder])
    return folder


def load(name="tiny.safetensors", precision="auto"):
    return LDMLoadModel().load(name, precision)


def test_example_inputs_are_copied_once_and_never_over_a_users_file(tmp_path):
    """What the pack does at load inside ComfyUI (nodes/examples.py): every input/*.png the shipped
    workflows load is put into ComfyUI's input folder, made if absent; a file of the same name stays."""
    from ldm_nodes.nodes.examples import EXAMPLES_DIR, copy_example_inputs

    shipped = sorted(p.name for p in EXAMPLES_DIR.glob("*.png"))
    assert {"shapes.png", "shapes_32.png", "inpaint.png"} <= set(shipped)
    folder = tmp_path / "input"
    (folder / "sub").mkdir(parents=True)
    (folder / "shapes.png").write_bytes(b"the user's own picture")
    assert copy_example_inputs(folder) == [n for n in shipped if n != "shapes.png"]
    assert (folder / "shapes.png").read_bytes() == b"the user's own picture"
    for name in (n for n in shipped if n != "shapes.png"):
        assert (folder / name).read_bytes() == (EXAMPLES_DIR / name).read_bytes()
    assert copy_example_inputs(folder) == []  # the second start copies nothing
    assert copy_example_inputs(tmp_path / "fresh" / "input") == shipped
    assert sorted(p.name for p in folder.iterdir()) == sorted({*shipped, "sub"})  # no temporary files left


def test_model_list_builtin_first_then_safetensors_files(tmp_path, models_dir, monkeypatch):
    builtin = tmp_path / "pack" / "models"
    builtin.mkdir(parents=True)
    shutil.copy(models_dir / "tiny.safetensors", builtin / "shapes.safetensors")
    monkeypatch.setattr(model_paths, "BUILTIN_DIR", builtin)
    shutil.copy(models_dir / "tiny.safetensors", models_dir / "sub" / "b.safetensors")
    (models_dir / "old.ckpt").write_bytes(b"pickle")
    (models_dir / "notes.txt").write_text("x")
    names = LDMLoadModel.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert names == ["builtin/shapes.safetensors", "sub/b.safetensors", "tiny.safetensors"]
    assert model_paths.resolve_model("builtin/shapes.safetensors") == (builtin / "shapes.safetensors").resolve()
    assert model_paths.resolve_model("sub/b.safetensors") == (models_dir / "sub" / "b.safetensors").resolve()


def test_ckpt_name_refusals(tmp_path, models_dir):
    outside = tmp_path / "x.safetensors"
    shutil.copy(models_dir / "tiny.safetensors", outside)
    (models_dir / "tiny.ckpt").write_bytes(b"not a pickle, but refused by name")
    (models_dir / "link.safetensors").symlink_to(outside)
    (models_dir / "sub" / "dir.safetensors").symlink_to(tmp_path, target_is_directory=True)
    for name in ["../x.safetensors", "sub/../../x.safetensors", str(outside), str(models_dir / "tiny.safetensors"),
                 "missing.safetensors", "tiny.ckpt", "tiny", "link.safetensors", "sub/dir.safetensors/x.safetensors",
                 "", "builtin/tiny.safetensors"]:
        with pytest.raises(ValueError, match="ckpt_name"):
            load(name)
    assert load("tiny.safetensors")[0].name == "tiny.safetensors"


def test_builtin_names_resolve_only_inside_the_packs_models_folder(tmp_path, models_dir, monkeypatch):
    with pytest.raises(ValueError, match="ckpt_name"):
        model_paths.resolve_model("builtin/../README.md")
    pack = tmp_path / "pack"
    (pack / "models").mkdir(parents=True)
    shutil.copy(models_dir / "tiny.safetensors", pack / "escape.safetensors")
    shutil.copy(models_dir / "tiny.safetensors", pack / "models" / "own.safetensors")
    (pack / "models" / "out.safetensors").symlink_to(pack / "escape.safetensors")
    (models_dir / "builtin").mkdir()
    shutil.copy(models_dir / "tiny.safetensors", models_dir / "builtin" / "user.safetensors")
    monkeypatch.setattr(model_paths, "BUILTIN_DIR", (pack / "models").resolve())
    assert model_paths.resolve_model("builtin/own.safetensors") == (pack / "models" / "own.safetensors").resolve()
    for name in ["builtin/../escape.safetensors", "builtin/out.safetensors", "builtin/user.safetensors",
                 "builtin/../models/../escape.safetensors"]:
        with pytest.raises(ValueError, match="ckpt_name"):
            model_paths.resolve_model(name)


def dtypes(module):
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("precision, cpu_bf16, unet, vae", [
    ("auto", False, torch.float32, torch.float32),  # a CPU without bf16 instructions: auto stays fp32
    ("auto", True, torch.bfloat16, torch.float32),  # avx512_bf16 / AMX: bf16, the autoencoder in fp32
    ("fp32", True, torch.float32, torch.float32),
    ("fp16", False, torch.float16, torch.float16),
    ("bf16", False, torch.bfloat16, torch.bfloat16),
])
def test_precision(models_dir, monkeypatch, precision, cpu_bf16, unet, vae):
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: cpu_bf16)
    model, text, autoencoder = load(precision=precision)
    assert dtypes(model.core.network) == {unet} and dtypes(text.core.model) == {unet}
    assert dtypes(autoencoder.core) == {vae}


def test_unknown_precision_is_refused(models_dir):
    with pytest.raises(ValueError, match="precision"):
        load(precision="fp8")


def test_loading_twice_shares_the_objects_while_they_live(models_dir):
    first = load()
    second = load()
    assert all(a is b for a, b in zip(first, second)), "a second load of a live model must reuse it"
    assert load(precision="fp16")[0] is not first[0]


def test_loaded_models_are_freed_and_then_loaded_anew(models_dir):
    first = load()
    refs = [weakref.ref(part) for part in first] + [weakref.ref(first[0].core.network)]
    del first
    gc.collect()
    assert all(ref() is None for ref in refs), "the cache must not keep a model alive"
    again = load()
    assert isinstance(again[0].core.network, UNetModel)
    os.utime(models_dir / "tiny.safetensors", (1, 1))  # a changed file is read again
    assert load()[0] is not again[0]


def test_noise_schedule_node(models_dir):
    model = load()[0]
    spec, sigmas = LDMNoiseSchedule().schedule("model", 12, "karras", False, model=model)
    assert spec == ScheduleSpec("model", 12, "karras", False)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1 and len(sigmas) == 13
    assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    torch.testing.assert_close(sigmas, spec.sigmas(model.core.schedule).float())
    _, linear = LDMNoiseSchedule().schedule("linear", 12, "leading", False)  # no model: 1000 timesteps
    assert linear[-1] == 0 and (linear[1:] < linear[:-1]).all() and not torch.allclose(linear, sigmas)


def test_noise_schedule_model_without_the_model_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        LDMNoiseSchedule().schedule("model", 10, "karras", False)


# ---------------------------------------------------------------------------------------------
# End to end through the node classes


@pytest.fixture(scope="module")
def graph(tiny_file):
    saved = list(model_paths._model_dirs)
    model_paths.set_model_dirs([tiny_file.parent])
    try:
        # fp32, not auto: auto is bf16 on CPUs with bf16 instructions, and these tests compare with fp32 oracles
        model, text_encoder, vae = LDMLoadModel().load("tiny.safetensors", "fp32")
    finally:
        model_paths.set_model_dirs(saved)
    positive = LDMEncodeText().encode(text_encoder, "a large red circle in the center on a blue background")[0]
    negative = LDMEncodeText().encode(text_encoder, "")[0]
    return {"model": model, "vae": vae, "positive": positive, "negative": negative}


def txt2img(graph, sampler_name="euler", seed=0, steps=3, batch_size=1, size=32, sigmas=None, **options):
    schedule = LDMNoiseSchedule().schedule("model", steps, "karras", False, model=graph["model"])[0]
    latent = LDMEmptyLatent().make(graph["vae"], size, size, batch_size)[0]
    extra = {} if sigmas is None else {"sigmas": sigmas}
    samples = LDMSample().sample(graph["model"], schedule, graph["positive"], graph["negative"], latent, seed,
                                 sampler_name, 4.0, 1.0, **extra, **options)[0]
    return LDMDecodeLatent().decode(graph["vae"], samples)[0]


def check_image(image, batch=1, size=32):
    assert image.shape == (batch, size, size, 3) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_txt2img_every_sampler(graph, sampler_name):
    image = txt2img(graph, sampler_name, steps=2 if sampler_name in ("heun", "plms") else 3)
    check_image(image)
    assert image.std() > 0


def test_txt2img_same_seed_same_image_other_seed_other_image(graph):
    a = txt2img(graph, "euler_ancestral", seed=7)
    b = txt2img(graph, "euler_ancestral", seed=7)
    c = txt2img(graph, "euler_ancestral", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_txt2img_batch(graph):
    image = txt2img(graph, "dpmpp_2m_sde", batch_size=2, ddpm_variance="beta", eta=0.5)
    check_image(image, batch=2)
    assert not torch.equal(image[0], image[1])


def test_linked_sigmas_replace_the_schedules(graph):
    sigmas = LDMNoiseSchedule().schedule("model", 3, "exponential", False, model=graph["model"])[1]
    linked = txt2img(graph, "dpmpp_2m", steps=8, sigmas=sigmas)
    schedule = LDMNoiseSchedule().schedule("model", 3, "exponential", False, model=graph["model"])[0]
    latent = LDMEmptyLatent().make(graph["vae"], 32, 32, 1)[0]
    samples = LDMSample().sample(graph["model"], schedule, graph["positive"], graph["negative"], latent, 0,
                                 "dpmpp_2m", 4.0, 1.0)[0]
    torch.testing.assert_close(linked, LDMDecodeLatent().decode(graph["vae"], samples)[0], atol=1e-4, rtol=0)


def test_img2img(graph):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    latent = LDMEncodeImage().encode(graph["vae"], image)[0]
    assert latent["samples"].shape == (1, 4, 16, 16)
    schedule = LDMNoiseSchedule().schedule("model", 4, "karras", False, model=graph["model"])[0]

    def run(latent, denoise, seed=3):
        samples = LDMSample().sample(graph["model"], schedule, graph["positive"], graph["negative"], latent, seed,
                                     "euler", 4.0, denoise)[0]
        return samples, LDMDecodeLatent().decode(graph["vae"], samples)[0]

    samples, out = run(latent, 0.5)
    check_image(out)
    assert not torch.equal(samples["samples"], latent["samples"])
    assert torch.equal(run(latent, 0.5)[1], out)
    other = LDMEncodeImage().encode(graph["vae"], 1 - image)[0]
    assert not torch.allclose(run(other, 0.5)[1], out)  # the result depends on the input image
    assert torch.equal(run(latent, 0.0)[0]["samples"], latent["samples"])  # denoise 0: nothing to do


def test_compile_model_samples_through_the_compiled_network_of_the_same_weights(graph, monkeypatch, tmp_path):
    """LDMCompileModel keeps the loaded weights (nothing loaded twice) and LDMSample then calls the network's
    package (here a stand-in: the eager network plus 1, built without a compiler) and says so."""
    from ldm_nodes.core import compiled
    from ldm_nodes.nodes import host

    plain, vae, conditioning = graph["model"], graph["vae"], graph["negative"]
    (fast,) = LDMCompileModel().compile(plain)
    assert fast.core.compile and not plain.core.compile and fast.core.network is plain.core.network
    assert fast.handle is plain.handle and fast.vae is plain.vae
    built, notes = [], []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(compiled, "build_package", lambda network, inputs, path: built.append(path))
    monkeypatch.setattr(compiled, "_PACKAGES", compiled.weakref.WeakKeyDictionary())
    network = fast.core.network

    class StandIn:  # the C++ runner of a package: the eager network plus 1
        def __init__(self, path, models):
            pass

        def run(self, inputs):
            return [network(*inputs) + 1]
    monkeypatch.setattr(compiled.torch._C._aoti, "AOTIModelContainerRunnerCpu", StandIn)

    class Noted(host.Progress):
        def note(self, text):
            notes.append(text)
    monkeypatch.setattr(host, "progress", Noted)
    latent = LDMEmptyLatent().make(vae, 32, 32, 1)[0]
    samples = []
    for model in (plain, fast):
        schedule = LDMNoiseSchedule().schedule("model", 1, "karras", False, model=model)[0]
        samples.append(LDMSample().sample(model, schedule, conditioning, conditioning, latent, 0, "euler", 4.0,
                                          1.0)[0]["samples"])
    assert len(built) == 1 and any("compiling the denoiser" in text for text in notes), notes
    # one euler step to sigma 0 lands on x - sigma_0 eps: the stand-in's eps + 1 moves it by sigma_0 / scale
    sigma_0 = schedule.sigmas(fast.core.schedule)[0].item()
    torch.testing.assert_close(samples[0] - samples[1], torch.full_like(samples[0], sigma_0 / fast.core.scale_factor),
                               rtol=1e-4, atol=1e-3)


def test_img2img_refuses_an_image_off_the_grid(graph):
    with pytest.raises(ValueError, match="image"):
        LDMEncodeImage().encode(graph["vae"], torch.rand(1, 31, 32, 3))


def test_sample_outputs_the_predicted_clean_latent_of_every_step(graph):
    """denoised_steps: D(x_k, sigma_k) after each step, step-major; oracle: the core Denoiser at the start
    (x_0 = noise * sqrt(1 + sigma_0^2) for an empty latent), and euler's last step, which lands on it."""
    import math

    from ldm_nodes.core.denoiser import Denoiser
    model = graph["model"]
    schedule = LDMNoiseSchedule().schedule("model", 3, "karras", False, model=model)[0]
    latent = LDMEmptyLatent().make(graph["vae"], 32, 32, 2)[0]
    out, steps = LDMSample().sample(model, schedule, graph["positive"], graph["negative"], latent, 5, "euler", 4.0, 1.0)
    core = model.get()
    assert steps["samples"].shape == (6, *out["samples"].shape[1:])
    torch.testing.assert_close(steps["samples"][4:], out["samples"], rtol=1e-5, atol=1e-5)
    sigmas = schedule.sigmas(core.schedule)
    x = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(5)) * math.sqrt(1 + sigmas[0] ** 2)
    denoiser = Denoiser(core.network, core.schedule, core.prediction, graph["positive"].context,
                        graph["negative"].context, 4.0)
    with torch.inference_mode():
        first = denoiser(x.float(), sigmas[0]) / core.scale_factor
    torch.testing.assert_close(steps["samples"][:2], first, rtol=1e-4, atol=1e-4)
