"""Run an API-format ComfyUI workflow of V1 node classes without ComfyUI, with ComfyUI's rules.

Public API
    load_workflow(path) -> dict             read an API-format workflow ("Export (API)" in ComfyUI)
    read_json(path)                         any JSON file (e.g. the UI workflow for `run(workflow=...)`)
    apply_overrides(prompt, ["5.seed=7"])   a copy with `--set NODE_ID.INPUT=VALUE` assignments applied
    validate(prompt, registry=None, ...)    the node ids to execute, in order; ValidationError lists every problem
    run(prompt, registry=None, ...)         validate, then execute; returns the image files written
    default_registry()                      this pack's NODE_CLASS_MAPPINGS plus STAND_INS
    STAND_INS                               SaveImage, PreviewImage, LoadImage (standins.py)
    progress(value, total)                  the progress hook for nodes: a no-op unless `run` is running one
    device() / set_device(name)             the torch device nodes should use headless (default "cpu")
    WorkflowError                           any problem reported to the user; its subclasses:
      ValidationError (.errors: one line each) and NodeError (.node_id, .class_type; the node's exception chained)

The graph's rules (ComfyUI's: which nodes run, links, types, widget limits, VALIDATE_INPUTS) are in
validation.py. Not supported: lazy inputs (all are evaluated), INPUT_IS_LIST / OUTPUT_IS_LIST,
async node functions, %date% in filename_prefix.

The stand-ins for ComfyUI's core nodes (SaveImage, PreviewImage, LoadImage) are in standins.py.

Host: importing the runner makes it the nodes' host (nodes/host.py): their device is the one
`set_device` chose, and a node's progress shows on stderr while `run` executes it as
"[node 5 LDMSample] 12/20" (redrawn with \\r on a terminal, one line per report otherwise).
"""
import copy
import json
from pathlib import Path

import torch

from .core.errors import InputError
from .core.progress import TextProgress
from .nodes import NODE_CLASS_MAPPINGS, host
from .standins import STAND_INS, Session, using
from .validation import NodeError, ValidationError, WorkflowError, call_kwargs, input_specs, validate_graph

# ----------------------------------------------------------------------------- run state

class _Host(host.Host):
    """The runner's host for the nodes: the device given by --device, and a text progress line per node."""

    def __init__(self):
        self.torch_device = torch.device("cpu")

    def device(self):
        return self.torch_device

    def progress(self, total):
        return _NodeProgress(total)


class _NodeProgress(host.Progress):
    def update(self, done, preview=None):
        progress(done, self.total)


_host = _Host()
host.configure(_host)
_bar = None  # the running node's progress line


def device():
    """The torch device our nodes run on headless (set by the CLI's --device; default cpu)."""
    return _host.torch_device


def usable_device(name):
    """torch.device(name) once a tensor can be made on it; InputError naming --device otherwise."""
    try:
        chosen = torch.device(name)
        torch.empty(0, device=chosen)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise InputError("--device", f"device {name[:80]!r} cannot be used: {str(error).splitlines()[0][:200]}") from None
    return chosen


def set_device(name):
    """Use torch device `name` ("cpu", "cuda", "cuda:1", "mps", ...); WorkflowError if it cannot be used."""
    try:
        _host.torch_device = usable_device(name)
    except InputError as error:
        raise WorkflowError(str(error)) from None


def progress(value, total):
    """Report that the running node has done `value` of `total` steps; a no-op outside `run`."""
    if _bar is not None:
        _bar.update(value, total)


# ----------------------------------------------------------------------------- reading and overriding

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # a workflow is about 5 levels deep: nodes, a node, its inputs, a link or a value's list


def read_json(path):
    """The JSON value in file `path`; WorkflowError naming the file (and the line and column).

    Refused by name: a file over MAX_JSON_BYTES, an integer beyond Python's digit limit, and nesting
    deeper than MAX_JSON_DEPTH (checked without recursion, so copying or walking it later is safe)."""
    try:
        if Path(path).stat().st_size > MAX_JSON_BYTES:
            raise WorkflowError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MB; not a workflow")
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise WorkflowError(f"{path}: cannot read: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise WorkflowError(f"{path}: not valid JSON: line {error.lineno} column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise WorkflowError(f"{path}: not UTF-8 text: {error}") from None
    except RecursionError:
        raise WorkflowError(f"{path}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as error:  # an integer of more digits than int() converts
        raise WorkflowError(f"{path}: not usable JSON: {error}") from None
    if _depth_over(value, MAX_JSON_DEPTH):
        raise WorkflowError(f"{path}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value


def _depth_over(value, limit):
    """Whether lists and objects in `value` nest deeper than `limit` (iteratively)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


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
            errors.append(f"--set {assignment[:200]}: {problem}")
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
    specs = input_specs(cls)
    if name not in specs:
        return f"node {node_id} ({node['class_type']}) has no input {name!r}; its inputs: {', '.join(specs)}"
    node["inputs"][name] = _parse_override(text, specs[name][0])
    return None


def _parse_override(text, kind):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (or digits or nesting beyond the limits): plain text
        return text
    if _depth_over(value, MAX_JSON_DEPTH):
        return text
    if isinstance(value, list) or not (kind == "STRING" or isinstance(kind, list)):
        return value
    return value if isinstance(kind, list) and value in kind else text


# ----------------------------------------------------------------------------- validation and execution

def validate(prompt, registry=None, *, out_dir="output", input_dir="input"):
    """The ids of the nodes to execute, in order; ValidationError listing every problem otherwise."""
    registry = default_registry() if registry is None else registry
    _check_out_dir(out_dir)
    with using(Session(Path(out_dir), Path(input_dir), prompt)):
        return validate_graph(prompt, registry)



def run(prompt, registry=None, *, out_dir="output", input_dir="input", workflow=None):
    """Validate `prompt`, then run what its output nodes need; returns the image files written.

    `workflow` (the UI-format graph) is embedded in saved PNGs beside the prompt, as ComfyUI does.
    """
    registry = default_registry() if registry is None else registry
    _check_out_dir(out_dir)
    with using(Session(Path(out_dir), Path(input_dir), prompt, _extra_pnginfo(workflow))) as current:
        order = validate_graph(prompt, registry)
        results, ui = {}, {}
        for node_id in order:
            results[node_id], ui[node_id] = _run_node(node_id, prompt[node_id], registry, results)
        return _written_files(ui, current)


def _check_out_dir(out_dir):
    """The output folder, or the nearest of its parents that exists, must be a folder (before any node runs)."""
    folder = Path(out_dir)
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == folder else f"is under {existing}, which is a file"
                raise ValidationError([f"--out {out_dir}: {where}, not a folder"])
            return


def _extra_pnginfo(workflow):
    return None if workflow is None else {"workflow": workflow}


def _run_node(node_id, node, registry, results):
    global _bar
    class_type = node["class_type"]
    cls = registry[class_type]
    _bar = TextProgress(f"node {node_id} {class_type}")
    try:
        output = getattr(cls(), cls.FUNCTION)(**call_kwargs(node_id, node, cls, results))
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


def _written_files(ui_outputs, current):
    roots = {"output": current.out_dir, "temp": current.temp_dir}
    return [roots[image["type"]] / image["subfolder"] / image["filename"]
            for ui in ui_outputs.values() if ui for image in ui.get("images", []) if image.get("type") in roots]


def default_registry():
    """This pack's nodes plus the stand-ins for ComfyUI's core nodes."""
    return {**STAND_INS, **NODE_CLASS_MAPPINGS}
