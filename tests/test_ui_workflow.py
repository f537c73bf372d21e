"""The files users share run headless: UI-format workflows (ComfyUI's Save) and the PNGs that ComfyUI or
the runner wrote, converted as ComfyUI's frontend converts a graph to a prompt (ui_workflow.py)."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import ldm_nodes
from ldm_nodes.headless import runner
from ldm_nodes.cli import main
from ldm_nodes.headless.ui_workflow import ui_to_api

PACK = Path(ldm_nodes.__file__).resolve().parent
WORKFLOWS = PACK / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
REGISTRY = runner.default_registry()


def ui(name):
    return runner.read_json(WORKFLOWS / f"{name}.json")


def sample_node(workflow):
    return next(n for n in workflow["nodes"] if n["type"] == "LDMSample")


@pytest.mark.parametrize("name", NAMES)
def test_each_shipped_ui_workflow_converts_to_exactly_its_api_twin(name):
    assert ui_to_api(ui(name), REGISTRY) == runner.read_json(WORKFLOWS / "api" / f"{name}.json")


def test_the_control_value_after_a_seed_is_skipped_and_may_be_missing():
    workflow = ui("txt2img")
    sample = sample_node(workflow)
    expected = ui_to_api(workflow, REGISTRY)[str(sample["id"])]["inputs"]
    sample["widgets_values"][:2] = [7, "randomize"]
    assert ui_to_api(workflow, REGISTRY)[str(sample["id"])]["inputs"] == {**expected, "seed": 7}
    del sample["widgets_values"][1]  # a file written without the control value: nothing shifts
    assert ui_to_api(workflow, REGISTRY)[str(sample["id"])]["inputs"] == {**expected, "seed": 7}


def test_optional_widgets_missing_at_the_end_take_their_defaults_extra_values_are_refused():
    workflow = ui("txt2img")
    sample = sample_node(workflow)
    del sample["widgets_values"][-3:]  # a file saved before eta, guidance_rescale, ddpm_variance existed
    inputs = ui_to_api(workflow, REGISTRY)[str(sample["id"])]["inputs"]
    assert (inputs["eta"], inputs["guidance_rescale"], inputs["ddpm_variance"]) == (-1.0, 0.0, "beta_tilde")
    sample["widgets_values"] += [-1.0, 0.0, "beta_tilde", "surplus"]
    with pytest.raises(runner.WorkflowError, match="more value"):
        ui_to_api(workflow, REGISTRY)
    del sample["widgets_values"][4:]
    with pytest.raises(runner.WorkflowError, match="no value for 'denoise'"):
        ui_to_api(workflow, REGISTRY)


def add_node(workflow, **node):
    workflow["nodes"].append(node)
    return node


def relink(workflow, link_id, source, slot=0):
    """Point the existing link `link_id` at output `slot` of node `source`."""
    for link in workflow["links"]:
        if link[0] == link_id:
            link[1:3] = [source, slot]


def test_a_widget_converted_to_an_input_takes_a_primitive_nodes_value():
    workflow = ui("txt2img")
    sample = sample_node(workflow)
    add_node(workflow, id=20, type="PrimitiveNode", mode=0, widgets_values=[1234, "fixed"],
             outputs=[{"name": "INT", "type": "INT", "links": [30]}])
    sample["inputs"].append({"name": "seed", "type": "INT", "link": 30, "widget": {"name": "seed"}})
    workflow["links"].append([30, 20, 0, sample["id"], len(sample["inputs"]) - 1, "INT"])
    assert ui_to_api(workflow, REGISTRY)[str(sample["id"])]["inputs"]["seed"] == 1234


def test_reroutes_and_notes_vanish_bypassed_nodes_pass_their_input_on_muted_nodes_are_left_out():
    workflow = ui("img2img")
    expected = runner.read_json(WORKFLOWS / "api" / "img2img.json")
    # LoadImage (5) -> Reroute (21) -> LDMEncodeImage (9), and a note beside them
    encode = next(n for n in workflow["nodes"] if n["id"] == 9)
    image_link = encode["inputs"][1]["link"]
    add_node(workflow, id=21, type="Reroute", mode=0, inputs=[{"name": "", "type": "*", "link": 40}],
             outputs=[{"name": "", "type": "IMAGE", "links": [image_link]}])
    workflow["links"].append([40, 5, 0, 21, 0, "IMAGE"])
    relink(workflow, image_link, 21)
    add_node(workflow, id=22, type="Note", mode=0, widgets_values=["the image goes through a reroute"])
    assert ui_to_api(workflow, REGISTRY) == expected
    # bypassing LDMEncodeImage hands LDMSample... nothing of type LATENT: its latent input stays unset
    encode["mode"] = 4
    bypassed = ui_to_api(workflow, REGISTRY)
    assert "9" not in bypassed and "latent" not in bypassed["6"]["inputs"]
    encode["mode"] = 2
    muted = ui_to_api(workflow, REGISTRY)
    assert "9" not in muted and "latent" not in muted["6"]["inputs"]
    with pytest.raises(runner.WorkflowError, match=r"node 6 \(LDMSample\) input 'latent': required input"):
        runner.validate(muted, input_dir=PACK / "input")


def test_a_bypassed_node_passes_the_input_of_its_output_type():
    workflow = ui("txt2img")
    add_node(workflow, id=23, type="LDMDecodeLatent", mode=4,
             inputs=[{"name": "vae", "type": "LDM_VAE", "link": 50}, {"name": "samples", "type": "LATENT", "link": 51}],
             outputs=[{"name": "IMAGE", "type": "IMAGE", "links": []}])
    workflow["links"] += [[50, 1, 2, 23, 0, "LDM_VAE"], [51, 6, 0, 23, 1, "LATENT"]]
    decode = next(n for n in workflow["nodes"] if n["id"] == 7)  # its samples now come through node 23
    decode["inputs"][1]["link"] = 52
    workflow["links"].append([52, 23, 0, 7, 1, "LATENT"])
    with pytest.raises(runner.WorkflowError):  # IMAGE output, no IMAGE input: the link is dropped ...
        runner.validate(ui_to_api(workflow, REGISTRY), input_dir=PACK / "input")
    workflow["nodes"][-1]["outputs"][0]["type"] = "LATENT"  # ... a LATENT output passes its LATENT input on
    assert ui_to_api(workflow, REGISTRY)["7"]["inputs"]["samples"] == ["6", 0]


def test_links_in_the_object_format_convert_the_same():
    workflow = ui("txt2img")
    workflow["links"] = [{"id": i, "origin_id": a, "origin_slot": s, "target_id": b, "target_slot": t, "type": k}
                         for i, a, s, b, t, k in workflow["links"]]
    assert ui_to_api(workflow, REGISTRY) == runner.read_json(WORKFLOWS / "api" / "txt2img.json")


def test_nodes_it_cannot_run_are_named_in_one_line():
    workflow = ui("txt2img")
    add_node(workflow, id=30, type="KSampler", mode=0, widgets_values=[])
    add_node(workflow, id=31, type="0f2a-group-node", mode=0, widgets_values=[])
    add_node(workflow, id=32, type="OtherPackNode", mode=4, widgets_values=[])  # bypassed: passes through
    with pytest.raises(runner.WorkflowError) as caught:
        ui_to_api(workflow, REGISTRY)
    message = str(caught.value)
    assert "\n" not in message and "node 30 (KSampler), node 31 (0f2a-group-node): cannot run headless" in message


def test_legacy_upload_button_value_of_load_image_is_skipped():
    workflow = ui("img2img")
    load = next(n for n in workflow["nodes"] if n["type"] == "LoadImage")
    load["widgets_values"] = ["shapes.png", "image"]
    assert ui_to_api(workflow, REGISTRY)["5"]["inputs"] == {"image": "shapes.png"}


# ---------------------------------------------------------------------------------------------
# The command line, with the built-in model


def test_a_ui_workflow_runs_and_its_png_runs_again_to_the_same_bytes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(WORKFLOWS / "txt2img.json"), "--out", "first", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress lines
    png = Path(captured.out.strip())
    with Image.open(png) as image:
        assert json.loads(image.info["workflow"]) == ui("txt2img")  # ComfyUI's canvas opens this graph
        assert json.loads(image.info["prompt"]) == runner.read_json(WORKFLOWS / "api" / "txt2img.json")
    assert main(["run", str(png), "--out", "second", "--quiet"]) == 0
    again = Path(capsys.readouterr().out.strip())
    assert again != png and again.read_bytes() == png.read_bytes()


def test_a_png_with_only_a_workflow_or_with_nothing(tmp_path):
    """ComfyUI writes both; a PNG whose prompt was stripped still runs from its workflow."""
    info = PngInfo()
    info.add_text("workflow", json.dumps(ui("txt2img")))
    Image.new("RGB", (4, 4)).save(tmp_path / "graph.png", pnginfo=info)
    prompt, workflow = runner.read_workflow(tmp_path / "graph.png")
    assert prompt == runner.read_json(WORKFLOWS / "api" / "txt2img.json") and workflow == ui("txt2img")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(runner.WorkflowError, match="plain.png: this PNG holds no workflow"):
        runner.read_workflow(tmp_path / "plain.png")


def test_with_overrides_the_png_embeds_the_prompt_that_ran_and_no_stale_graph(tmp_path, capsys):
    workflow = copy.deepcopy(ui("txt2img"))
    (tmp_path / "wf.json").write_text(json.dumps(workflow))
    assert main(["run", str(tmp_path / "wf.json"), "--out", str(tmp_path / "out"), "-q", "--set", "4.steps=3"]) == 0
    with Image.open(capsys.readouterr().out.strip()) as image:
        assert "workflow" not in image.info and json.loads(image.info["prompt"])["4"]["inputs"]["steps"] == 3


# ---------------------------------------------------------------------------------------------
# Subgraphs: real exports of the frontend 1.58.1 (tests/data/subgraphs, made by export.mjs there from
# workflows/txt2img.json with 4 steps): each UI file beside the prompt the frontend's graphToPrompt made of it.

SUBGRAPHS = Path(__file__).resolve().parent / "data" / "subgraphs"
SUBGRAPH_CASES = ["text", "decode_save", "nested", "promoted", "bypassed", "muted"]


def executable(prompt):
    """What the server reads of a prompt (the _meta titles are the frontend's display names, unread)."""
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}


@pytest.mark.parametrize("case", SUBGRAPH_CASES + [f"1.27.10/{case}" for case in SUBGRAPH_CASES[:4]])
def test_a_subgraph_export_converts_to_the_frontends_own_prompt(case):
    """Also the same cases exported by frontend 1.27.10 (ComfyUI 0.3.64's own). Its bypassed and muted
    cases are kept but not compared: 1.27.10 still sends the nodes inside a muted or bypassed subgraph
    (a muted subgraph's SaveImage runs), which later frontends fixed; the runner follows 1.58.1."""
    ours = ui_to_api(runner.read_json(SUBGRAPHS / f"{case}.json"), REGISTRY)
    theirs = runner.read_json(SUBGRAPHS / f"{case}.api.json")
    assert executable(ours) == executable(theirs)
    for node_id, node in ours.items():  # a node's own title is kept
        if node["_meta"]["title"] != node["class_type"]:
            assert node["_meta"] == theirs[node_id]["_meta"]


def test_the_subgraph_cases_cover_what_they_claim():
    """Guards the test data: ids of nested instances, a promoted widget's value set on the instance (seed 7,
    cfg 3.5 over the inner 42 and 5), a bypassed instance passing the empty latent on, a muted one left out."""
    prompts = {case: runner.read_json(SUBGRAPHS / f"{case}.api.json") for case in SUBGRAPH_CASES}
    assert {"9:2", "9:3"} <= set(prompts["text"]) and {"10:9:2", "10:6"} <= set(prompts["nested"])
    assert {"9:7", "9:8"} <= set(prompts["decode_save"])
    sample = prompts["promoted"]["9:6"]["inputs"]
    assert (sample["seed"], sample["cfg"]) == (7, 3.5)
    assert prompts["bypassed"]["7"]["inputs"]["samples"] == ["5", 0] and "LDMSample" not in str(prompts["bypassed"])
    assert [n["class_type"] for n in prompts["muted"].values()].count("SaveImage") == 1
    muted = runner.read_json(SUBGRAPHS / "muted.json")
    subgraph_ids = {d["id"] for d in muted["definitions"]["subgraphs"]}
    assert [n["mode"] for n in muted["nodes"] if n["type"] in subgraph_ids] == [2]


@pytest.mark.parametrize("case", ["nested", "promoted", "bypassed", "muted"])
def test_a_subgraph_file_runs_pixel_identical_to_the_frontends_api_export(case, tmp_path, capsys):
    assert main(["run", str(SUBGRAPHS / f"{case}.json"), "--out", str(tmp_path / "ui"), "-q"]) == 0
    (ui_png,) = capsys.readouterr().out.split()
    assert main(["run", str(SUBGRAPHS / f"{case}.api.json"), "--out", str(tmp_path / "api"), "-q"]) == 0
    (api_png,) = capsys.readouterr().out.split()
    with Image.open(ui_png) as a, Image.open(api_png) as b:
        assert a.size == b.size and a.tobytes() == b.tobytes()


def test_a_png_comfyui_wrote_from_a_subgraph_workflow_runs_again(tmp_path, capsys):
    """nested.png: ComfyUI 0.3.64's SaveImage output of the nested case, queued from frontend 1.58.1. Its
    prompt has the instance ids; its embedded workflow, converted, is that prompt; a run gives its pixels."""
    prompt, workflow = runner.read_workflow(SUBGRAPHS / "nested.png")
    assert "10:6" in prompt and workflow["definitions"]["subgraphs"]
    assert executable(ui_to_api(workflow, REGISTRY)) == executable(prompt)
    # in fp32, as ComfyUI ran it then (precision auto is bf16 on CPUs with bf16 instructions since)
    loader = next(node_id for node_id, node in prompt.items() if node["class_type"] == "LDMLoadModel")
    assert main(["run", str(SUBGRAPHS / "nested.png"), "--out", str(tmp_path), "-q",
                 "--set", f"{loader}.precision=fp32"]) == 0
    (png,) = capsys.readouterr().out.split()
    with Image.open(png) as ours, Image.open(SUBGRAPHS / "nested.png") as theirs:
        assert ours.size == theirs.size
        difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
        assert difference.max() <= 1, difference.max()  # ComfyUI's process and ours: the same CPU torch


def test_a_node_it_cannot_run_inside_a_subgraph_is_named_with_its_title_and_subgraph():
    workflow = runner.read_json(SUBGRAPHS / "text.json")
    (definition,) = workflow["definitions"]["subgraphs"]
    negative = next(n for n in definition["nodes"] if n["id"] == 3)
    negative["type"] = "OtherPackNode"
    with pytest.raises(runner.WorkflowError) as caught:
        ui_to_api(workflow, REGISTRY)
    message = str(caught.value)
    assert message.startswith("node 9:3 'Negative' (OtherPackNode) in subgraph 'New Subgraph': cannot run headless")
    assert message.endswith(", ".join(runner.STAND_INS)) and "SetLatentNoiseMask" in message
    del workflow["definitions"]
    with pytest.raises(runner.WorkflowError, match=rf"node 9 \(subgraph {definition['id']}, whose definition is not "):
        ui_to_api(workflow, REGISTRY)


def test_a_subgraph_that_contains_itself_is_refused():
    workflow = runner.read_json(SUBGRAPHS / "text.json")
    (definition,) = workflow["definitions"]["subgraphs"]
    definition["nodes"].append({"id": 50, "type": definition["id"], "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(runner.WorkflowError, match="contains itself"):
        ui_to_api(workflow, REGISTRY)


@pytest.mark.parametrize("case, instance", [("muted", "11"), ("bypassed", "9")])
def test_frontend_1_27_10_sends_a_muted_or_bypassed_subgraphs_nodes_and_the_runner_does_not(case, instance):
    ours = executable(ui_to_api(runner.read_json(SUBGRAPHS / f"1.27.10/{case}.json"), REGISTRY))
    theirs = executable(runner.read_json(SUBGRAPHS / f"1.27.10/{case}.api.json"))
    inside = {k for k in theirs if k.startswith(f"{instance}:")}
    assert inside and {k: v for k, v in theirs.items() if k not in inside} == ours
