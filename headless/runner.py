"""Run an API-format ComfyUI workflow of V1 node classes without ComfyUI, with ComfyUI's rules.

Public API
    load_workflow(path) -> dict             the API-format prompt of a workflow file: API JSON ("Export (API)"),
                                            UI JSON (ComfyUI's Save) or a PNG written by ComfyUI or by `run`
    read_workflow(path) -> (prompt, workflow)  the same, and the UI graph when the file has one (for `run`)
    read_json(path)                         any JSON file
    apply_overrides(prompt, ["5.seed=7"])   a copy with `--set NODE_ID.INPUT=VALUE` assignments applied
    validate(prompt, registry=None, ...)    the node ids to execute, in order; ValidationError lists every problem
    run(prompt, registry=None, ...)         validate, then execute; returns the image files written. Many runs
                                            in one process share the imports and torch's warm-up (README)
    default_registry()                      this pack's NODE_CLASS_MAPPINGS plus STAND_INS
    STAND_INS                               the seven ComfyUI core nodes a headless run may use (standins.py)
    progress(value, total)                  the progress hook for nodes: a no-op unless `run` is running one
    device() / set_device(name)             the torch device nodes should use headless (default "cpu")
    WorkflowError                           any problem reported to the user; its subclasses:
      ValidationError (.errors: one line each) and NodeError (.node_id, .class_type; the node's exception chained)

The graph's rules (ComfyUI's: which nodes run, links, types, widget limits, VALIDATE_INPUTS) are in
validation.py; the UI format's conversion in ui_workflow.py; the variables of SaveImage's filename_prefix
(%NODE.WIDGET%, %date:...%, %width%, %year%, ...) in save_names.py. Not supported: lazy inputs (all are
evaluated), INPUT_IS_LIST / OUTPUT_IS_LIST, async node functions.

The stand-ins for ComfyUI's core nodes (SaveImage, PreviewImage, LoadImage and four mask nodes) are in
standins.py.

Host: importing the runner makes it the nodes' host (nodes/host.py): their device is the one
`set_device` chose, and a node's progress shows on stderr while `run` executes it as
"[node 5 LDMSample] 12/20" (redrawn with \\r on a terminal, one line per report otherwise), unless
`run(..., show_progress=False)` (the CLI's --quiet).
"""
import copy
import io
import json
from pathlib import Path

import torch
from PIL import Image

from ..core.devices import usable_device
from ..core.errors import InputError
from ..core.files import file_in_the_way, unwritable_folder
from ..core.progress import TextProgress
from ..nodes import NODE_CLASS_MAPPINGS, host
from .save_names import fill_prompt
from .session import Session, using
from .standins import STAND_INS
from .ui_workflow import is_ui_workflow, ui_to_api
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

    def note(self, text):
        if _bar is not None:
            _bar.update(0, self.total, text)


_host = _Host()
host.configure(_host)
_bar = None  # the running node's progress line


def device():
    """The torch device our nodes run on headless (set by the CLI's --device; default cpu)."""
    return _host.torch_device


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

    Refused by name: a file over MAX_JSON_BYTES (the read itself is capped: st_size is 0 for devices
    and pipes such as /dev/zero and /dev/stdin), an integer beyond Python's digit limit, and nesting
    deeper than MAX_JSON_DEPTH (checked without recursion, so copying or walking it later is safe)."""
    with _opened(path) as file:
        return _json_value(_read_capped(file, path), path)


def _opened(path):
    try:
        return open(path, "rb")
    except OSError as error:
        raise WorkflowError(f"{path}: cannot read: {error.strerror or error}") from None


def _read_capped(file, path, head=b""):
    """`head` and the rest of `file`, at most MAX_JSON_BYTES in all, whatever the file's size says."""
    try:
        data = head + file.read(MAX_JSON_BYTES + 1 - len(head))
    except OSError as error:
        raise WorkflowError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(data) > MAX_JSON_BYTES:
        raise WorkflowError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MB; not a workflow")
    return data


def _json_value(data, where):
    """The JSON value in `data` (bytes of UTF-8, or text) with read_json's limits; `where` names it in errors."""
    try:
        value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except json.JSONDecodeError as error:
        raise WorkflowError(f"{where}: not valid JSON: line {error.lineno} column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise WorkflowError(f"{where}: not UTF-8 text: {error}") from None
    except RecursionError:
        raise WorkflowError(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as error:  # an integer of more digits than int() converts
        raise WorkflowError(f"{where}: not usable JSON: {error}") from None
    if _depth_over(value, MAX_JSON_DEPTH):
        raise WorkflowError(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
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
    """The API-format prompt of the workflow file `path` (see read_workflow); WorkflowError naming the file."""
    return read_workflow(path)[0]


def read_workflow(path, registry=None):
    """(the API-format prompt, the UI-format workflow or None) of the file `path`: an API-format JSON file,
    a UI-format one (converted with the nodes' own input declarations, ui_workflow.py), or a PNG written
    by ComfyUI or by `run` (its "prompt" text, else its "workflow"). WorkflowError naming the file."""
    registry = default_registry() if registry is None else registry
    with _opened(path) as file:  # opened once: a pipe cannot be read twice
        head = _read_head(file, path)
        if head == PNG_SIGNATURE:
            prompt, workflow = _png_workflow(file, path, head)
        else:
            data = _json_value(_read_capped(file, path, head), path)
            prompt, workflow = (None, data) if is_ui_workflow(data) else (data, None)
    if prompt is None:
        try:
            prompt = ui_to_api(workflow, registry)
        except WorkflowError as error:
            raise WorkflowError(f"{path}: {error}") from None
    if not isinstance(prompt, dict):
        raise WorkflowError(f"{path}: expected a JSON object mapping node ids to nodes")
    return prompt, workflow


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_head(file, path):
    try:
        return file.read(len(PNG_SIGNATURE))
    except OSError as error:
        raise WorkflowError(f"{path}: cannot read: {error.strerror or error}") from None


def _png_workflow(file, path, head):
    """(prompt or None, workflow or None) embedded in a PNG's text chunks, as ComfyUI's SaveImage writes them,
    each with read_json's limits. Pillow reads only the chunks before the pixels; a stream that cannot seek
    (a pipe) is read whole, with read_json's cap."""
    try:
        source = file if file.seekable() else io.BytesIO(_read_capped(file, path, head))
        source.seek(0)
        with Image.open(source, formats=["PNG"]) as image:
            texts = dict(image.info)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # ValueError: a text chunk over
        raise WorkflowError(f"{path}: cannot read the PNG: {error}") from None  # Pillow's limits
    found = {key: _json_value(texts[key], f"{path}: its embedded {key}")
             for key in ("prompt", "workflow") if isinstance(texts.get(key), str)}
    if not found:
        raise WorkflowError(f"{path}: this PNG holds no workflow (no \"prompt\" or \"workflow\" text chunk; "
                            "ComfyUI and `run` embed both unless metadata is turned off)")
    return found.get("prompt"), found.get("workflow")


def apply_overrides(prompt, assignments, registry=None):
    """A copy of `prompt` with each "NODE_ID.INPUT=VALUE" applied (`prompt` itself when there are none).

    VALUE is JSON when it parses (numbers, true/false, lists: a list is a link), else plain text;
    STRING and COMBO inputs take the text as written (`5.text=42` is "42") unless it is a list
    or a COMBO's own non-text option.
    """
    if not assignments:
        return prompt
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
    prompt = fill_prompt(prompt)
    with using(Session(Path(out_dir), Path(input_dir), prompt)):
        return validate_graph(prompt, registry)



def run(prompt, registry=None, *, out_dir="output", input_dir="input", workflow=None, show_progress=True):
    """Validate `prompt`, then run what its output nodes need; returns the image files written.

    `workflow` (the UI-format graph) is embedded in saved PNGs beside the prompt, as ComfyUI does.
    show_progress=False keeps the nodes' progress lines off stderr.
    """
    registry = default_registry() if registry is None else registry
    _check_out_dir(out_dir)
    prompt = fill_prompt(prompt)  # what ComfyUI's frontend fills in before it queues a prompt
    with using(Session(Path(out_dir), Path(input_dir), prompt, _extra_pnginfo(workflow))) as current:
        order = validate_graph(prompt, registry)
        results, ui = {}, {}
        for node_id in order:
            results[node_id], ui[node_id] = _run_node(node_id, prompt[node_id], registry, results, show_progress)
        return _written_files(ui, current)


def _check_out_dir(out_dir):
    """The output folder, or the nearest of its parents that exists, must be a folder that takes new
    files (before any node runs)."""
    folder = Path(out_dir)
    blocking = file_in_the_way(folder)
    if blocking is not None:
        where = "is a file" if blocking == folder else f"is under {blocking}, which is a file"
        raise ValidationError([f"--out {out_dir}: {where}, not a folder"])
    refused = unwritable_folder(folder)
    if refused is not None:
        raise ValidationError([f"--out {out_dir}: cannot write in {refused[0]} ({refused[1]})"])


def _extra_pnginfo(workflow):
    return None if workflow is None else {"workflow": workflow}


def _run_node(node_id, node, registry, results, show_progress=True):
    global _bar
    class_type = node["class_type"]
    cls = registry[class_type]
    _bar = TextProgress(f"node {node_id} {class_type}") if show_progress else None
    try:
        output = getattr(cls(), cls.FUNCTION)(**call_kwargs(node_id, node, cls, results))
    except Exception as error:
        raise NodeError(node_id, class_type, _describe(error)) from error
    finally:
        if _bar is not None:
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
