"""A UI-format workflow (what ComfyUI's Save writes, and what it embeds in a PNG as "workflow") as the
API-format prompt the runner executes: what ComfyUI's frontend does in `graphToPrompt`.

The conversion reads the nodes' own declarations (INPUT_TYPES of this pack's nodes and the
stand-ins):
- widgets_values hold the widget inputs' values in declaration order, required then optional. An
  INT input with `control_after_generate` (or, as the frontend's legacy rule has it, named seed or
  noise_seed) is followed by its control value ("fixed", "randomize", ...), which is skipped: the run
  uses the stored value, as ComfyUI's next run does (a file without the control value reads right too). Old files keep LoadImage's upload button value
  ("image") after the file name; it is skipped too. Optional widgets missing at the end take their
  defaults (a file saved before they were appended).
- Links set inputs by the target's `inputs[slot]` entry, so widgets converted to inputs work: a link
  replaces the widget's value.
- Frontend-only nodes: Note and MarkdownNote are dropped; Reroute passes its input on; a
  PrimitiveNode gives its value to the widgets it is linked to.
- Muted nodes (mode 2) are left out, and links from them with them; bypassed nodes (mode 4) pass
  each output on from their input of the same type (the same slot first), as the frontend does.
- Anything else that is not a known node (a core node without a stand-in, another pack's node, a
  group node or subgraph) is a WorkflowError naming the node ids and classes.
"""
from .validation import WorkflowError, input_specs

WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these INTs even without the option
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
DROPPED = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4
VALUE = object()  # marks a PrimitiveNode's value among (node id, slot) sources


def is_ui_workflow(data):
    """Whether `data` looks like a UI-format workflow (nodes and links lists) rather than an API prompt."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def ui_to_api(workflow, registry):
    """The API-format prompt {node_id: {"class_type", "inputs", "_meta"}} of a UI-format workflow."""
    if not is_ui_workflow(workflow):
        raise WorkflowError("workflow: expected ComfyUI's UI format (an object with nodes and links)")
    nodes = {}
    for node in workflow["nodes"]:
        if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
            raise WorkflowError(f"workflow: a node without an id and a type: {str(node)[:80]}")
        nodes[node["id"]] = node
    runnable = {i: n for i, n in nodes.items() if n["type"] not in DROPPED | {"Reroute", "PrimitiveNode"}
                and n.get("mode", 0) != MUTED}
    unknown = [f"node {i} ({n['type']})" for i, n in runnable.items()
               if n["type"] not in registry and n.get("mode", 0) != BYPASSED]
    if unknown:
        raise WorkflowError(f"{', '.join(unknown)}: cannot run headless; it knows only this pack's nodes and the "
                            "stand-ins SaveImage, PreviewImage and LoadImage")
    links = _links(workflow)
    prompt = {}
    for node_id, node in runnable.items():
        if node.get("mode", 0) == BYPASSED:
            continue
        inputs = _widget_inputs(node, registry[node["type"]])
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            name = (entry.get("widget") or {}).get("name") or entry["name"]
            source = _resolve(entry["link"], links, nodes)
            if source is None:  # fed by nothing (a muted node): a widget keeps its value, a link input stays unset
                continue
            inputs[name] = source[1] if source[0] is VALUE else [str(source[0]), source[1]]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


def _links(workflow):
    """{link id: (source node id, source slot)} from either link format (lists in 0.4, objects in 1.x)."""
    found = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            found[link[0]] = (link[1], link[2])
        elif isinstance(link, dict) and {"id", "origin_id", "origin_slot"} <= set(link):
            found[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            raise WorkflowError(f"workflow: a link that is neither [id, from, slot, to, slot, type] nor an "
                                f"object: {str(link)[:80]}")
    return found


def _resolve(link_id, links, nodes, seen=None):
    """(node id, output slot) of the node that really feeds link `link_id`, (VALUE, v) for a
    PrimitiveNode's value, or None when nothing does (a muted source, an unconnected pass-through)."""
    seen = set() if seen is None else seen
    if link_id in seen:
        raise WorkflowError(f"workflow: link {link_id} loops through Reroute or bypassed nodes")
    seen.add(link_id)
    if link_id not in links:
        raise WorkflowError(f"workflow: link {link_id} is used by an input but not in the links list")
    source_id, slot = links[link_id]
    source = nodes.get(source_id)
    if source is None:
        raise WorkflowError(f"workflow: link {link_id} comes from node {source_id}, which is not in the workflow")
    if source["type"] == "PrimitiveNode":
        values = source.get("widgets_values") or []
        if not values:
            raise WorkflowError(f"node {source_id} (PrimitiveNode): has no value")
        return VALUE, values[0]
    if source.get("mode", 0) == MUTED:
        return None
    if source["type"] == "Reroute" or source.get("mode", 0) == BYPASSED:
        entry = _pass_through_input(source, slot)
        return None if entry is None else _resolve(entry["link"], links, nodes, seen)
    return source_id, slot


def _pass_through_input(node, slot):
    """The linked input a Reroute or a bypassed node passes to output `slot`: the same slot when its type
    matches, else the first input of that type (the frontend's rule); None if there is none."""
    inputs = [entry for entry in node.get("inputs") or [] if entry.get("link") is not None]
    if node["type"] == "Reroute":
        return inputs[0] if inputs else None
    outputs = node.get("outputs") or []
    kind = outputs[slot].get("type") if slot < len(outputs) else None
    own = (node.get("inputs") or [])[slot:slot + 1]
    for entry in [*own, *inputs]:
        if entry.get("link") is not None and entry.get("type") == kind:
            return entry
    return None


def _is_widget(kind, options):
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def _has_control(name, kind, options):
    return kind == "INT" and options.get("control_after_generate", name in SEED_NAMES)


def _widget_inputs(node, cls):
    """{input name: value} for the node's widget inputs, read from widgets_values in declaration order."""
    where = f"node {node['id']} ({node['type']})"
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes save {name: value}
        return {name: values[name] for name, (kind, options, _) in input_specs(cls).items()
                if _is_widget(kind, options) and name in values}
    inputs, position = {}, 0
    for name, (kind, options, category) in input_specs(cls).items():
        if not _is_widget(kind, options):
            continue
        if position >= len(values):
            if category == "required" or "default" not in options:
                raise WorkflowError(f"{where}: widgets_values has no value for {name!r} (the file was saved by "
                                    f"another version of the node)")
            inputs[name] = options["default"]
            continue
        inputs[name] = values[position]
        position += 1
        if _has_control(name, kind, options) and position < len(values) and values[position] in CONTROL_VALUES:
            position += 1
        if options.get("image_upload") and position < len(values) and values[position] == "image":
            position += 1
    if position != len(values):
        raise WorkflowError(f"{where}: widgets_values has {len(values) - position} more value(s) than the node has "
                            f"widgets ({values[position:]!r:.80}); the file was saved by another version of the node")
    return inputs
