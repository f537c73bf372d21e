"""Run an API-format ComfyUI workflow of V1 node classes without ComfyUI, with ComfyUI's rules.

Public API
    load_workflow(path) -> dict             read an API-format workflow ("Export (API)" in ComfyUI)
    read_json(path)                         any JSON file (e.g. the UI workflow for `run(workflow=...)`)
    apply_overrides(prompt, ["5.seed=7"])   a copy with `--set NODE_ID.INPUT=VALUE` assignments applied
    validate(prompt, registry=None, ...)    the node ids to execute, in order; ValidationError lists every problem
    run(prompt, registry=None, ...)         validate, then execute; returns the image files written
    default_registry()                      this pack's NODE_CLASS_MAPPINGS plus STAND_INS
    STAND_INS                               SaveImage, PreviewImage, LoadImage with ComfyUI's input names
    progress(value, total)                  the progress hook for nodes: a no-op unless `run` is running one
    device() / set_device(name)             the torch device nodes should use headless (default "cpu")
    WorkflowError                           any problem reported to the user; its subclasses:
      ValidationError (.errors: one line each) and NodeError (.node_id, .class_type; the node's exception chained)

Semantics (ComfyUI's execution.py): every node's class_type must be known; only the nodes that
output nodes (OUTPUT_NODE = True) need are validated and executed, each once, in dependency order,
and a workflow without an output node is refused. A list value is a link [node_id, output_index];
links are type-checked as ComfyUI does (equal, "*", or overlapping comma-separated names). Widget
values are checked for type (INT, FLOAT, BOOLEAN, STRING; stricter than ComfyUI, which would
coerce "12" to 12), min/max and COMBO membership, except for the inputs a VALIDATE_INPUTS
classmethod takes, which ComfyUI leaves to it (linked ones arrive as None); a string it returns is
an error, and it should name the input in it ("ckpt_name: ..."). Input names a class does not
declare are ignored; optional inputs are passed only when given; hidden inputs PROMPT,
EXTRA_PNGINFO and UNIQUE_ID are filled in; FLOAT widgets get floats (JSON writes 7.0 as 7).
Unlike ComfyUI, which still runs the outputs that validate, any problem stops the whole run, and
a link from an undeclared input does not make its source run. Not supported: lazy inputs (all
are evaluated), INPUT_IS_LIST / OUTPUT_IS_LIST, async node functions, %date% in filename_prefix.

Files: SaveImage writes <out>/<filename_prefix>_00001_.png, ... (numbering continues after the
files already there) and refuses a prefix that leaves <out>; PreviewImage writes the same way to
<out>/temp/ComfyUI_temp_00001_.png, ... (ComfyUI's temp folder; delete it freely). LoadImage reads
names inside the input folder only.

Progress: a node calls `runner.progress(i, total)`; while `run` executes it, stderr shows
"[node 5 LDMSample] 12/20" (redrawn with \\r on a terminal, one line per call otherwise).
"""
import copy
import inspect
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

PRIMITIVES = {"INT": ((int,), "an integer"), "FLOAT": ((int, float), "a number"),
              "BOOLEAN": ((bool,), "true or false"), "STRING": ((str,), "a string")}


class WorkflowError(Exception):
    """A workflow that cannot run: unreadable file, bad override, invalid graph or failing node."""


class ValidationError(WorkflowError):
    """Every problem found before running; `errors` holds one line per problem."""

    def __init__(self, errors):
        self.errors = list(errors)
        count = f"{len(self.errors)} problem" + ("s" if len(self.errors) > 1 else "")
        super().__init__(f"invalid workflow ({count}):\n" + "\n".join("  " + e for e in self.errors))


class NodeError(WorkflowError):
    """A node that raised while running (the original exception is chained as __cause__)."""

    def __init__(self, node_id, class_type, message):
        self.node_id, self.class_type = node_id, class_type
        super().__init__(f"node {node_id} ({class_type}): {message}")


# ----------------------------------------------------------------------------- run state

@dataclass
class _Session:
    out_dir: Path = Path("output")
    input_dir: Path = Path("input")
    prompt: dict | None = None
    extra_pnginfo: dict | None = None

    @property
    def temp_dir(self):
        return self.out_dir / "temp"

    def hidden(self, kind, node_id):
        return {"PROMPT": self.prompt, "EXTRA_PNGINFO": self.extra_pnginfo, "UNIQUE_ID": node_id}.get(kind)


_session = _Session()
_device = torch.device("cpu")
_bar = None


@contextmanager
def _using(session):
    global _session
    previous, _session = _session, session
    try:
        yield session
    finally:
        _session = previous


def device():
    """The torch device our nodes run on headless (set by the CLI's --device; default cpu)."""
    return _device


def set_device(name):
    """Use torch device `name` ("cpu", "cuda", "cuda:1", "mps", ...); WorkflowError if it cannot be used."""
    global _device
    try:
        chosen = torch.device(name)
        torch.empty(0, device=chosen)
    except (RuntimeError, AssertionError) as error:
        raise WorkflowError(f"device {name!r} cannot be used: {error}") from error
    _device = chosen


# ----------------------------------------------------------------------------- progress

class _Bar:
    WIDTH = 20

    def __init__(self, label):
        self.label, self.open = label, False

    def update(self, value, total):
        stream = sys.stderr
        if not stream.isatty():
            print(f"[{self.label}] {value}/{total}", file=stream)
            return
        filled = min(max(int(self.WIDTH * value / max(total, 1)), 0), self.WIDTH)
        stream.write(f"\r[{self.label}] {'#' * filled}{'.' * (self.WIDTH - filled)} {value}/{total}")
        stream.flush()
        self.open = True

    def close(self):
        if self.open:
            sys.stderr.write("\n")


def progress(value, total):
    """Report that the running node has done `value` of `total` steps; a no-op outside `run`."""
    if _bar is not None:
        _bar.update(value, total)


# ----------------------------------------------------------------------------- reading and overriding

def read_json(path):
    """The JSON value in file `path`; WorkflowError naming the file (and the line and column)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise WorkflowError(f"{path}: cannot read: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise WorkflowError(f"{path}: not valid JSON: line {error.lineno} column {error.colno}: {error.msg}") from error
    except UnicodeDecodeError as error:
        raise WorkflowError(f"{path}: not UTF-8 text: {error}") from error


def load_workflow(path):
    """The API-format workflow in the JSON file `path`; WorkflowError naming the file otherwise."""
    prompt = read_json(path)
    if isinstance(prompt, dict) and "nodes" in prompt and "links" in prompt:
        raise WorkflowError(f"{path}: this is ComfyUI's UI format; save it with 'Export (API)' (see workflows/api/)")
    if not isinstance(prompt, dict):
        raise WorkflowError(f"{path}: expected a JSON object mapping node ids to nodes")
    return prompt


def apply_overrides(prompt, assignments, registry=None):
    """A copy of `prompt` with each "NODE_ID.INPUT=VALUE" applied.

    VALUE is JSON when it parses (numbers, true/false, lists: a list is a link), else plain text;
    STRING and COMBO inputs take the text as written (`5.text=42` is "42") unless it is a list
    or a COMBO's own non-text option.
    """
    registry = default_registry() if registry is None else registry
    prompt = copy.deepcopy(prompt)
    errors = []
    for assignment in assignments:
        problem = _apply_override(prompt, assignment, registry)
        if problem:
            errors.append(f"--set {assignment}: {problem}")
    if errors:
        raise ValidationError(errors)
    return prompt


def _apply_override(prompt, assignment, registry):
    target, equals, text = assignment.partition("=")
    node_id, dot, name = target.partition(".")
    if not (equals and dot and node_id and name):
        return "expected NODE_ID.INPUT=VALUE"
    node = prompt.get(node_id)
    if not isinstance(node, dict) or not isinstance(node.setdefault("inputs", {}), dict):
        return f"no node {node_id} in the workflow"
    cls = registry.get(node.get("class_type"))
    if cls is None:
        return f"node {node_id} has the unknown class {node.get('class_type')!r}"
    specs = _input_specs(cls)
    if name not in specs:
        return f"node {node_id} ({node['class_type']}) has no input {name!r}; its inputs: {', '.join(specs)}"
    node["inputs"][name] = _parse_override(text, specs[name][0])
    return None


def _parse_override(text, kind):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(value, list) or not (kind == "STRING" or isinstance(kind, list)):
        return value
    return value if isinstance(kind, list) and value in kind else text


# ----------------------------------------------------------------------------- node declarations

def _inputs(node):
    return node.get("inputs", {})


def _input_specs(cls):
    """{name: (type, options, "required"|"optional")} for the inputs a class declares."""
    declared = cls.INPUT_TYPES()
    return {name: (spec[0], spec[1] if len(spec) > 1 else {}, category)
            for category in ("required", "optional") for name, spec in declared.get(category, {}).items()}


def _hidden_specs(cls):
    return cls.INPUT_TYPES().get("hidden", {})


def _is_link(value):
    return isinstance(value, list)


def _combo_options(kind, options):
    if isinstance(kind, list):
        return kind
    return options.get("options") if kind == "COMBO" else None


def _validator_inputs(cls, specs):
    """The input names VALIDATE_INPUTS receives (all of them when it takes **kwargs)."""
    validator = getattr(cls, "VALIDATE_INPUTS", None)
    if validator is None:
        return set()
    params = inspect.signature(validator).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(specs) | set(_hidden_specs(cls))
    return {p.name for p in params}


def _call_kwargs(node_id, node, cls, results):
    """Keyword arguments for the node's function; linked inputs are None when `results` is None."""
    kwargs = {}
    for name, (kind, _, _) in _input_specs(cls).items():
        if name not in _inputs(node):
            continue
        value = _inputs(node)[name]
        if _is_link(value):
            kwargs[name] = None if results is None else results[str(value[0])][value[1]]
        else:
            kwargs[name] = float(value) if kind == "FLOAT" else value
    for name, kind in _hidden_specs(cls).items():
        kwargs[name] = _session.hidden(kind, node_id)
    return kwargs


# ----------------------------------------------------------------------------- validation

def validate(prompt, registry=None, *, out_dir="output", input_dir="input"):
    """The ids of the nodes to execute, in order; ValidationError listing every problem otherwise."""
    registry = default_registry() if registry is None else registry
    with _using(_Session(Path(out_dir), Path(input_dir), prompt)):
        return _validate(prompt, registry)


def _validate(prompt, registry):
    if not isinstance(prompt, dict):
        raise ValidationError(["workflow: expected a JSON object mapping node ids to nodes"])
    classes, errors = _known_classes(prompt, registry)
    outputs = sorted((i for i, cls in classes.items() if getattr(cls, "OUTPUT_NODE", False) is True), key=_id_order)
    if not outputs:
        errors.append("workflow: no output node (SaveImage, PreviewImage or another node with OUTPUT_NODE = True); "
                      "ComfyUI refuses such a workflow too")
    order, cycle_errors = _execution_order(outputs, prompt, classes)
    for node_id in order:
        errors += _node_problems(node_id, prompt, classes)
    errors += cycle_errors
    if errors:
        raise ValidationError(errors)
    return order


def _known_classes(prompt, registry):
    classes, errors = {}, []
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str) or not isinstance(_inputs(node), dict):
            errors.append(f"node {node_id}: expected {{\"class_type\": ..., \"inputs\": {{...}}}}")
        elif class_type not in registry:
            errors.append(f"node {node_id} ({class_type}): no such node; headless runs know only this pack's nodes "
                          "and the stand-ins SaveImage, PreviewImage and LoadImage")
        else:
            classes[node_id] = registry[class_type]
    return classes, errors


def _id_order(node_id):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _links(node, cls):
    """(input name, source node id) for the declared inputs that are links."""
    specs = _input_specs(cls)
    return [(name, str(value[0])) for name, value in _inputs(node).items() if name in specs and _is_link(value) and value]


def _execution_order(outputs, prompt, classes):
    """Depth-first from the output nodes: (the nodes they need, dependencies first; cycle errors)."""
    order, state, errors = [], {}, []

    def visit(node_id, path):  # path: the nodes from an output down to node_id
        state[node_id] = "open"
        for name, source in _links(prompt[node_id], classes[node_id]):
            if state.get(source) == "open":
                cycle = " -> ".join(path[path.index(source):] + [source])
                errors.append(f"{_where(node_id, prompt, name)}: dependency cycle {cycle}")
            elif source in classes and source not in state:
                visit(source, path + [source])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in outputs:
        if node_id not in state:
            visit(node_id, [node_id])
    return order, errors


def _where(node_id, prompt, name=None):
    text = f"node {node_id} ({prompt[node_id]['class_type']})"
    return f"{text} input {name!r}" if name else text


def _node_problems(node_id, prompt, classes):
    node, cls = prompt[node_id], classes[node_id]
    specs = _input_specs(cls)
    validated_by_node = _validator_inputs(cls, specs)
    errors = []
    for name, (kind, options, category) in specs.items():
        if name not in _inputs(node):
            problem = "required input is missing" if category == "required" else None
        elif _is_link(_inputs(node)[name]):
            problem = _link_problem(_inputs(node)[name], kind, prompt, classes)
        else:
            problem = _value_problem(_inputs(node)[name], kind, options, name not in validated_by_node)
        if problem:
            errors.append(f"{_where(node_id, prompt, name)}: {problem}")
    if validated_by_node and not errors:
        errors += _custom_problems(node_id, prompt, cls, validated_by_node)
    return errors


def _link_problem(link, kind, prompt, classes):
    if len(link) != 2 or not isinstance(link[0], (str, int)) or type(link[1]) is not int:
        return f"bad link {link!r}: expected [node_id, output_index]"
    source, index = str(link[0]), link[1]
    if source not in prompt:
        return f"links to node {source}, which is not in the workflow"
    if source not in classes:
        return None  # the source node's own error says why
    returns = classes[source].RETURN_TYPES
    if not 0 <= index < len(returns):
        return f"links to output {index} of {_where(source, prompt)}, which has {len(returns)} outputs"
    if not _types_match(returns[index], kind):
        return f"takes {_type_name(kind)}, but output {index} of {_where(source, prompt)} is {_type_name(returns[index])}"
    return None


def _type_name(kind):
    return "COMBO" if isinstance(kind, list) else kind


def _types_match(received, expected):
    received, expected = _type_name(received), _type_name(expected)
    if received == expected or "*" in (received, expected):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _value_problem(value, kind, options, check_limits):
    combo = _combo_options(kind, options)
    if combo is not None:
        return None if not check_limits or value in combo else f"{value!r} is not one of {_shorten(combo)}"
    if kind == "*":
        return None
    if kind not in PRIMITIVES:
        return f"must be linked to an output of type {kind}, not set to {value!r}"
    types, description = PRIMITIVES[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "BOOLEAN"):
        return f"expects {description}, got {value!r}"
    return _range_problem(value, options) if check_limits and kind in ("INT", "FLOAT") else None


def _range_problem(value, options):
    if "min" in options and value < options["min"]:
        return f"{value} is below the minimum {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value} is above the maximum {options['max']}"
    return None


def _shorten(options):
    return repr(options) if len(options) <= 20 else repr(options[:20])[:-1] + f", ...] ({len(options)} options)"


def _custom_problems(node_id, prompt, cls, names):
    kwargs = _call_kwargs(node_id, prompt[node_id], cls, None)
    try:
        verdict = cls.VALIDATE_INPUTS(**{k: v for k, v in kwargs.items() if k in names})
    except Exception as error:  # a validator's own bug is reported like a failed check
        return [f"{_where(node_id, prompt)}: VALIDATE_INPUTS raised {type(error).__name__}: {error}"]
    if verdict is True:
        return []
    return [f"{_where(node_id, prompt)}: {verdict if verdict is not False else 'VALIDATE_INPUTS failed'}"]


# ----------------------------------------------------------------------------- execution

def run(prompt, registry=None, *, out_dir="output", input_dir="input", workflow=None):
    """Validate `prompt`, then run what its output nodes need; returns the image files written.

    `workflow` (the UI-format graph) is embedded in saved PNGs beside the prompt, as ComfyUI does.
    """
    registry = default_registry() if registry is None else registry
    with _using(_Session(Path(out_dir), Path(input_dir), prompt, _extra_pnginfo(workflow))) as session:
        order = _validate(prompt, registry)
        results, ui = {}, {}
        for node_id in order:
            results[node_id], ui[node_id] = _run_node(node_id, prompt[node_id], registry, results)
        return _written_files(ui, session)


def _extra_pnginfo(workflow):
    return None if workflow is None else {"workflow": workflow}


def _run_node(node_id, node, registry, results):
    global _bar
    class_type = node["class_type"]
    cls = registry[class_type]
    _bar = _Bar(f"node {node_id} {class_type}")
    try:
        output = getattr(cls(), cls.FUNCTION)(**_call_kwargs(node_id, node, cls, results))
    except Exception as error:
        raise NodeError(node_id, class_type, _describe(error)) from error
    finally:
        _bar.close()
        _bar = None
    return _split_output(output, node_id, class_type, cls)


def _describe(error):
    return str(error) if isinstance(error, (ValueError, WorkflowError)) else f"{type(error).__name__}: {error}"


def _split_output(output, node_id, class_type, cls):
    ui, result = (output.get("ui"), output.get("result", ())) if isinstance(output, dict) else (None, output)
    if not isinstance(result, (tuple, list)) or len(result) != len(cls.RETURN_TYPES):
        raise NodeError(node_id, class_type, f"returned {result!r:.80} for its {len(cls.RETURN_TYPES)} outputs")
    return tuple(result), ui


def _written_files(ui_outputs, session):
    roots = {"output": session.out_dir, "temp": session.temp_dir}
    return [roots[image["type"]] / image["subfolder"] / image["filename"]
            for ui in ui_outputs.values() if ui for image in ui.get("images", []) if image.get("type") in roots]


# ----------------------------------------------------------------------------- stand-ins for ComfyUI's I/O nodes

def _check(function, *args):
    """VALIDATE_INPUTS' verdict on function(*args): True, or the message of its ValueError.

    The last argument is the input checked; None (a linked input) is left to run time."""
    if args[-1] is None:
        return True
    try:
        function(*args)
    except ValueError as error:
        return str(error)
    return True


def _save_target(root, filename_prefix):
    """(folder, file name prefix, subfolder) for a SaveImage prefix; ValueError if it leaves `root`."""
    relative = os.path.normpath(filename_prefix)
    subfolder, name = os.path.split(relative)
    root = Path(root).resolve()
    folder = (root / subfolder).resolve()
    if not folder.is_relative_to(root) or name in ("", ".", ".."):
        raise ValueError(f"filename_prefix: {filename_prefix!r} must name files inside the output folder {root}")
    return folder, name, subfolder.replace(os.sep, "/")


def _next_counter(folder, name):
    pattern = re.compile(re.escape(os.path.normcase(name)) + r"_(\d+)_")
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(os.path.normcase(f)))]
    return max(numbers, default=0) + 1


def _png_info(prompt, extra_pnginfo):
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def _save_pngs(images, root, filename_prefix, kind, compress_level, prompt, extra_pnginfo):
    folder, name, subfolder = _save_target(root, filename_prefix)
    folder.mkdir(parents=True, exist_ok=True)
    counter, info = _next_counter(folder, name), _png_info(prompt, extra_pnginfo)
    results = []
    for index, image in enumerate(images):
        pixels = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
        file = f"{name}_{counter + index:05}_.png"
        Image.fromarray(pixels).save(folder / file, pnginfo=info, compress_level=compress_level)
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
    return {"ui": {"images": results}}


class SaveImage:
    """ComfyUI's SaveImage: numbered PNGs in the output folder, with the workflow embedded."""
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        return _check(_save_target, _session.out_dir, filename_prefix)

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return _save_pngs(images, _session.out_dir, filename_prefix, "output", 4, prompt, extra_pnginfo)


class PreviewImage:
    """ComfyUI's PreviewImage: headless, numbered PNGs in <out>/temp (ComfyUI_temp_00001_.png, ...)."""
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        return _save_pngs(images, _session.temp_dir, "ComfyUI_temp", "temp", 1, prompt, extra_pnginfo)


def _input_file(name):
    root = _session.input_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image: {name!r} resolves outside the input folder {root}")
    if not path.is_file():
        raise ValueError(f"image: no file {name!r} in the input folder {root}")
    return path


class LoadImage:
    """ComfyUI's LoadImage: IMAGE [1,H,W,3] and MASK [1,H,W] = 1 - alpha (zeros 64x64 without alpha)."""
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        folder = _session.input_dir
        files = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _check(_input_file, image)

    def load_image(self, image):
        with Image.open(_input_file(image)) as opened:
            picture = ImageOps.exif_transpose(opened)
        rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255
        if "A" in picture.getbands() or "transparency" in picture.info:
            mask = 1 - np.asarray(picture.convert("RGBA").getchannel("A"), dtype=np.float32) / 255
        else:
            mask = np.zeros((64, 64), dtype=np.float32)
        return torch.from_numpy(rgb)[None], torch.from_numpy(mask)[None]


STAND_INS = {"SaveImage": SaveImage, "PreviewImage": PreviewImage, "LoadImage": LoadImage}


def default_registry():
    """This pack's nodes plus the stand-ins (imported here: nodes may import this module for `progress`)."""
    from .nodes import NODE_CLASS_MAPPINGS
    return {**STAND_INS, **NODE_CLASS_MAPPINGS}
