"""runner.py (headless execution of API-format workflows) and the `run` command, with fake V1 nodes."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_nodes.headless import runner
from ldm_nodes.cli import main

CALLS = []  # (class name, node id, kwargs) of every node function call


def record(cls, unique_id, **kwargs):
    CALLS.append((cls.__name__, unique_id, kwargs))


class MakeImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 8, "min": 1, "max": 64}),
                             "height": ("INT", {"default": 8, "min": 1, "max": 64}),
                             "color": (["red", "green", "blue"],)},
                "optional": {"brightness": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def make(self, width, height, color, unique_id, **optional):
        record(MakeImage, unique_id, width=width, color=color, **optional)
        image = torch.zeros(2, height, width, 3)
        image[..., ["red", "green", "blue"].index(color)] = optional.get("brightness", 1.0)
        return image, torch.ones(2, height, width)


class Scale:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "scale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "factor": ("FLOAT", {"min": 0.0, "max": 4.0})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def scale(self, image, factor, unique_id):
        record(Scale, unique_id, factor=factor)
        return (image * factor,)


class Sink:
    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}, "optional": {"mask": ("MASK",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    def take(self, image, unique_id, mask=None):
        record(Sink, unique_id, image=image, mask=mask)
        return {"ui": {"text": ["ok"]}, "result": ()}


class Picky:
    """VALIDATE_INPUTS owns `text` (so its COMBO check is skipped) and gets linked inputs as None."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "pick"
    SEEN = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "text": (["a", "b"],)}}

    @classmethod
    def VALIDATE_INPUTS(cls, image, text):
        cls.SEEN.append((image, text))
        return True if text != "bad" else f"text: {text!r} is refused"

    def pick(self, image, text):
        return (image,)


class Broken:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "fail"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def fail(self):
        raise RuntimeError("boom")


class Stepper:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "step"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def step(self, image):
        for i in range(1, 4):
            runner.progress(i, 3)
        return (image,)


REGISTRY = {**runner.STAND_INS, **{c.__name__: c for c in (MakeImage, Scale, Sink, Picky, Broken, Stepper)}}


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()
    Picky.SEEN.clear()


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}


def make(**overrides):
    return node("MakeImage", **{"width": 4, "height": 3, "color": "red", **overrides})


def graph(**nodes):
    """A workflow with node ids "1", "2", ... from keyword names n1, n2, ..."""
    return {name[1:]: spec for name, spec in nodes.items()}


def saving_graph(prefix="shapes/run"):
    return graph(n1=make(brightness=0.5), n2=node("Scale", image=["1", 0], factor=2),
                 n3=node("SaveImage", images=["2", 0], filename_prefix=prefix))


def run(prompt, tmp_path, **kwargs):
    return runner.run(prompt, REGISTRY, out_dir=tmp_path / "out", input_dir=tmp_path / "in", **kwargs)


def errors_of(prompt, tmp_path):
    with pytest.raises(runner.ValidationError) as caught:
        run(prompt, tmp_path)
    assert CALLS == [], "nothing may run when validation fails"
    return caught.value.errors


# ----------------------------------------------------------------------------- running and saving

def test_graph_runs_and_save_image_writes_numbered_pngs_with_the_prompt(tmp_path):
    prompt = saving_graph()
    paths = run(prompt, tmp_path, workflow={"nodes": ["ui"]})
    folder = tmp_path / "out" / "shapes"
    assert paths == [folder / "run_00001_.png", folder / "run_00002_.png"]
    with Image.open(paths[0]) as saved:
        assert json.loads(saved.text["prompt"]) == prompt
        assert json.loads(saved.text["workflow"]) == {"nodes": ["ui"]}
        pixels = np.asarray(saved)
    assert pixels.shape == (3, 4, 3) and (pixels[..., 0] == 255).all() and (pixels[..., 1:] == 0).all()


def test_numbering_continues_after_existing_files(tmp_path):
    run(saving_graph(), tmp_path)
    (tmp_path / "out" / "shapes" / "run_00041_.png").touch()
    paths = run(saving_graph(), tmp_path)
    assert [p.name for p in paths] == ["run_00042_.png", "run_00043_.png"]
    with Image.open(paths[0]) as saved:
        assert "workflow" not in saved.text


def test_preview_image_writes_to_the_temp_folder_inside_out(tmp_path):
    prompt = graph(n1=make(), n2=node("PreviewImage", images=["1", 0]))
    paths = run(prompt, tmp_path)
    assert paths == [tmp_path / "out" / "temp" / f"ComfyUI_temp_0000{i}_.png" for i in (1, 2)]
    assert all(p.is_file() for p in paths)


def test_only_nodes_that_outputs_need_run_each_once_dependencies_first(tmp_path):
    prompt = graph(n1=make(), n2=node("Scale", image=["1", 0], factor=1.5),
                   n3=node("Sink", image=["2", 0], mask=["1", 1]), n4=node("Sink", image=["1", 0]),
                   n5=make(width=1000), n6=node("Scale", image=["5", 0], factor=1))  # 5, 6: unused, not validated
    assert run(prompt, tmp_path) == []
    assert [(name, node_id) for name, node_id, _ in CALLS] == [
        ("MakeImage", "1"), ("Scale", "2"), ("Sink", "3"), ("Sink", "4")]
    sink_kwargs = CALLS[2][2]
    assert sink_kwargs["image"].shape == (2, 3, 4, 3) and sink_kwargs["mask"].shape == (2, 3, 4)


def test_optional_inputs_only_when_given_extras_ignored_floats_coerced(tmp_path):
    prompt = graph(n1=make(not_an_input=7, not_a_link=["9", 0]), n2=node("Scale", image=["1", 0], factor=2),
                   n3=node("Sink", image=["2", 0]), n9=node("Broken"))
    run(prompt, tmp_path)
    assert CALLS[0][2] == {"width": 4, "color": "red"}
    factor = CALLS[1][2]["factor"]
    assert factor == 2.0 and isinstance(factor, float)


def test_validate_inputs_gets_its_inputs_linked_ones_as_none_and_owns_its_combo(tmp_path):
    prompt = graph(n1=make(), n2=node("Picky", image=["1", 0], text="not in the list"), n3=node("Sink", image=["2", 0]))
    run(prompt, tmp_path)
    assert Picky.SEEN == [(None, "not in the list")]
    CALLS.clear()
    prompt["2"]["inputs"]["text"] = "bad"
    assert errors_of(prompt, tmp_path) == ["node 2 (Picky): text: 'bad' is refused"]


def test_a_failing_node_is_named_and_its_exception_chained(tmp_path):
    prompt = graph(n1=node("Broken"), n2=node("Sink", image=["1", 0]))
    with pytest.raises(runner.NodeError) as caught:
        run(prompt, tmp_path)
    assert str(caught.value) == "node 1 (Broken): RuntimeError: boom"
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_progress_prints_node_bars_during_a_run_only(tmp_path, capsys):
    runner.progress(1, 3)
    assert capsys.readouterr().err == ""
    run(graph(n1=make(), n5=node("Stepper", image=["1", 0]), n6=node("Sink", image=["5", 0])), tmp_path)
    assert capsys.readouterr().err.splitlines() == [f"[node 5 Stepper] {i}/3" for i in (1, 2, 3)]


def test_progress_can_be_turned_off(tmp_path, capsys):
    """The CLI's --quiet: no progress lines, on a terminal or not."""
    run(graph(n1=make(), n5=node("Stepper", image=["1", 0]), n6=node("Sink", image=["5", 0])), tmp_path,
        show_progress=False)
    assert capsys.readouterr().err == ""


def test_progress_redraws_one_line_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    run(graph(n1=make(), n5=node("Stepper", image=["1", 0]), n6=node("Sink", image=["5", 0])), tmp_path)
    assert sys.stderr.getvalue() == "".join(f"\r[node 5 Stepper] {'#' * (20 * i // 3):.<20} {i}/3" for i in (1, 2, 3)) + "\n"


def test_device_is_settable_and_checked():
    try:
        runner.set_device("cpu")
        assert runner.device() == torch.device("cpu")
        for name in ("no_such_device", "cuda:99"):  # not a device; a device this machine lacks
            with pytest.raises(runner.WorkflowError, match=name):
                runner.set_device(name)
        assert runner.device() == torch.device("cpu")
    finally:
        runner.set_device("cpu")


# ----------------------------------------------------------------------------- validation errors

@pytest.mark.parametrize("change, expected", [
    (lambda p: p.update({"1": node("NoSuchNode")}), "node 1 (NoSuchNode): no such node"),
    (lambda p: p["2"]["inputs"].update(image=["1", 1]), "node 2 (Scale) input 'image': takes IMAGE, but output 1 of "
                                                        "node 1 (MakeImage) is MASK"),
    (lambda p: p["2"]["inputs"].update(image=["1", 2]), "node 2 (Scale) input 'image': links to output 2 of "
                                                        "node 1 (MakeImage), which has 2 outputs"),
    (lambda p: p["2"]["inputs"].update(image=["77", 0]), "node 2 (Scale) input 'image': links to node 77, "
                                                         "which is not in the workflow"),
    (lambda p: p["2"]["inputs"].update(image="pixels"), "node 2 (Scale) input 'image': must be linked to an output of type IMAGE, not set to 'pixels'"),
    (lambda p: p["1"]["inputs"].pop("width"), "node 1 (MakeImage) input 'width': required input is missing"),
    (lambda p: p["1"]["inputs"].update(width=65), "node 1 (MakeImage) input 'width': 65 is above the maximum 64"),
    (lambda p: p["1"]["inputs"].update(height=0), "node 1 (MakeImage) input 'height': 0 is below the minimum 1"),
    (lambda p: p["1"]["inputs"].update(width="8"), "node 1 (MakeImage) input 'width': expects an integer, got '8'"),
    (lambda p: p["1"]["inputs"].update(width=True), "node 1 (MakeImage) input 'width': expects an integer"),
    (lambda p: p["2"]["inputs"].update(factor=9.5), "node 2 (Scale) input 'factor': 9.5 is above the maximum 4.0"),
    (lambda p: p["1"]["inputs"].update(color="purple"), "node 1 (MakeImage) input 'color': 'purple' is not one of "
                                                        "['red', 'green', 'blue']"),
    (lambda p: p["3"]["inputs"].update(filename_prefix="../escape"), "node 3 (SaveImage): filename_prefix: '../escape'"),
    (lambda p: p["3"]["inputs"].update(filename_prefix="a/../../escape"), "node 3 (SaveImage): filename_prefix:"),
])
def test_bad_inputs_name_node_class_and_input(tmp_path, change, expected):
    prompt = saving_graph()
    change(prompt)
    errors = errors_of(prompt, tmp_path)
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_absolute_filename_prefix_is_refused_and_nothing_is_written(tmp_path):
    prompt = saving_graph(prefix=str(tmp_path / "elsewhere" / "x"))
    assert errors_of(prompt, tmp_path)[0].startswith("node 3 (SaveImage): filename_prefix:")
    assert list(tmp_path.iterdir()) == []


def test_every_error_is_collected(tmp_path):
    prompt = saving_graph()
    prompt["1"]["inputs"].update(width=0, color="purple")
    prompt["2"]["inputs"].update(factor=-1)
    prompt["9"] = node("Mystery")
    errors = errors_of(prompt, tmp_path)
    assert [e.split(":")[0] for e in errors] == [
        "node 9 (Mystery)", "node 1 (MakeImage) input 'width'", "node 1 (MakeImage) input 'color'",
        "node 2 (Scale) input 'factor'"]
    with pytest.raises(runner.ValidationError, match=r"invalid workflow \(4 problems\):\n  node 9"):
        run(prompt, tmp_path)


def test_a_workflow_without_output_node_is_refused(tmp_path):
    errors = errors_of(graph(n1=make(), n2=node("Scale", image=["1", 0], factor=1)), tmp_path)
    assert len(errors) == 1 and errors[0].startswith("workflow: no output node")


def test_a_cycle_is_refused(tmp_path):
    prompt = graph(n1=node("Scale", image=["2", 0], factor=1), n2=node("Scale", image=["1", 0], factor=1),
                   n3=node("Sink", image=["1", 0]))
    assert errors_of(prompt, tmp_path) == ["node 2 (Scale) input 'image': dependency cycle 1 -> 2 -> 1"]


def test_validate_returns_the_execution_order(tmp_path):
    prompt = graph(n3=node("Sink", image=["2", 0]), n2=node("Scale", image=["1", 0], factor=1), n1=make())
    assert runner.validate(prompt, REGISTRY) == ["1", "2", "3"]


# ----------------------------------------------------------------------------- LoadImage

def test_load_image_gives_image_and_mask_as_comfyui(tmp_path):
    (tmp_path / "in").mkdir()
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 255, 51
    Image.fromarray(rgba).save(tmp_path / "in" / "a.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "in" / "b.png")
    prompt = graph(n1=node("LoadImage", image="a.png"), n2=node("Sink", image=["1", 0], mask=["1", 1]),
                   n3=node("LoadImage", image="b.png"), n4=node("Sink", image=["3", 0], mask=["3", 1]))
    run(prompt, tmp_path)
    (_, _, alpha), (_, _, opaque) = CALLS
    assert alpha["image"].dtype == torch.float32 and alpha["image"].shape == (1, 5, 6, 3)
    assert torch.equal(alpha["image"][..., 1], torch.ones(1, 5, 6))
    assert torch.allclose(alpha["mask"], torch.full((1, 5, 6), 0.8))
    assert torch.equal(opaque["mask"], torch.zeros(1, 64, 64))


@pytest.mark.parametrize("name, message", [("../secret.png", "resolves outside the input folder"),
                                           ("missing.png", "no file 'missing.png'")])
def test_load_image_refuses_names_outside_the_input_folder(tmp_path, name, message):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "secret.png")
    errors = errors_of(graph(n1=node("LoadImage", image=name), n2=node("Sink", image=["1", 0])), tmp_path)
    assert len(errors) == 1 and errors[0].startswith("node 1 (LoadImage): image: ") and message in errors[0]


# ----------------------------------------------------------------------------- --set overrides

def test_overrides_parse_json_or_text_by_input_type():
    prompt = saving_graph()
    changed = runner.apply_overrides(prompt, ["1.width=32", "1.brightness=0.25", "1.color=green", "3.filename_prefix=42",
                                              '2.image=["1", 1]'], REGISTRY)
    assert changed["1"]["inputs"] == {"width": 32, "height": 3, "color": "green", "brightness": 0.25}
    assert changed["3"]["inputs"]["filename_prefix"] == "42" and changed["2"]["inputs"]["image"] == ["1", 1]
    assert prompt == saving_graph(), "the original is left alone"


def test_bad_overrides_are_all_named():
    with pytest.raises(runner.ValidationError) as caught:
        runner.apply_overrides(saving_graph(), ["99.width=3", "1.widht=3", "width=3"], REGISTRY)
    assert caught.value.errors == [
        "--set 99.width=3: no node 99 in the workflow",
        "--set 1.widht=3: node 1 (MakeImage) has no input 'widht'; its inputs: width, height, color, brightness",
        "--set width=3: expected NODE_ID.INPUT=VALUE"]


# ----------------------------------------------------------------------------- the command line

def write(path, prompt):
    path.write_text(json.dumps(prompt, indent=1))
    return str(path)


def test_cli_runs_load_image_to_save_image_with_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(tmp_path / "in" / "pic.png")
    workflow = write(tmp_path / "wf.json", graph(n1=node("LoadImage", image="nothing.png"),
                                                 n2=node("SaveImage", images=["1", 0], filename_prefix="x")))
    assert main(["run", workflow, "--out", "out", "--input-dir", "in",
                 "--set", "1.image=pic.png", "--set", "2.filename_prefix=copies/pic"]) == 0
    assert capsys.readouterr().out.splitlines() == [os.path.join("out", "copies", "pic_00001_.png")]
    with Image.open(tmp_path / "out" / "copies" / "pic_00001_.png") as saved:
        assert np.asarray(saved)[0, 0].tolist() == [10, 20, 30]
        assert json.loads(saved.text["prompt"])["1"]["inputs"]["image"] == "pic.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "wf.json"]


def test_cli_malformed_json_names_file_and_line_without_traceback(tmp_path):
    (tmp_path / "bad.json").write_text('{\n  "1": {"class_type": "SaveImage",\n  "inputs": {,}}\n}\n')
    done = subprocess.run([sys.executable, "-m", "ldm_nodes", "run", "bad.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "bad.json: not valid JSON: line 3 column" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


@pytest.mark.parametrize("prompt, extra_args, message", [
    (graph(n1=node("KSampler"), n2=node("SaveImage", images=["1", 0], filename_prefix="x")), [],
     "node 1 (KSampler): no such node; headless runs know only this pack's nodes and the stand-ins"),
    (graph(n1=node("LoadImage", image="a.png"), n2=node("SaveImage", images=["1", 0], filename_prefix="x")),
     ["--set", "2.prefix=y"], "--set 2.prefix=y: node 2 (SaveImage) has no input 'prefix'"),
    ({"nodes": [{"id": 3, "type": "KSampler", "widgets_values": []}], "links": []}, [],
     "node 3 (KSampler): cannot run headless"),
    (graph(n1=node("LoadImage", image="a.png")), ["--device", "no_such_device"], "device 'no_such_device'"),
])
def test_cli_errors_exit_non_zero_with_a_message(tmp_path, capsys, prompt, extra_args, message):
    workflow = write(tmp_path / "wf.json", prompt)
    assert main(["run", workflow, "--out", str(tmp_path / "out"), *extra_args]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err, captured.err
    assert not (tmp_path / "out").exists()
