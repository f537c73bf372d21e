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
- Subgraphs (workflow["definitions"]["subgraphs"], frontends since 2025) are expanded as the
  frontend's graphToPrompt expands them: inner nodes get instance-path ids ("9:2", nested "10:9:2"),
  subgraph inputs and outputs are followed through, widgets promoted to the instance give their values,
  a muted or bypassed instance is treated like a muted or bypassed node (see "subgraphs" below).
- Anything else that is not a known node (a core node without a stand-in, another pack's node, a
  group node, a subgraph whose definition is missing) is a WorkflowError naming each node by id, title
  and class (and the subgraph it sits in), and listing the stand-ins there are.
"""
from .standins import STAND_INS
from .validation import WorkflowError, input_specs

WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these INTs even without the option
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
DROPPED = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # the ids of a subgraph definition's input and output nodes
VALUE = object()  # marks a value (a PrimitiveNode's, a promoted widget's) among (node id, slot) sources


def is_ui_workflow(data):
    """Whether `data` looks like a UI-format workflow (nodes and links lists) rather than an API prompt."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def ui_to_api(workflow, registry):
    """The API-format prompt {node_id: {"class_type", "inputs", "_meta"}} of a UI-format workflow."""
    if not is_ui_workflow(workflow):
        raise WorkflowError("workflow: expected ComfyUI's UI format (an object with nodes and links)")
    definitions = _subgraph_definitions(workflow)
    root = _Scope(_Graph(workflow), (), None, None)
    placed = list(_instances(root, definitions))
    # the nodes that run: not the frontend's own (notes, reroutes, primitives), not muted, not bypassed (a
    # bypassed node's inputs pass through to its outputs when its consumers' links are resolved)
    runnable = [(scope, n) for scope, n in placed if n["type"] not in DROPPED | {"Reroute", "PrimitiveNode"}
                and n.get("mode", 0) not in (MUTED, BYPASSED)]
    unknown = [_describe(scope, n) for scope, n in runnable if n["type"] not in registry]
    if unknown:
        raise WorkflowError(f"{', '.join(unknown)}: cannot run headless; it runs this pack's nodes and the "
                            f"stand-ins {', '.join(STAND_INS)}")
    prompt = {}
    for scope, node in runnable:
        inputs = _widget_inputs(node, registry[node["type"]], _describe(scope, node))
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            name = (entry.get("widget") or {}).get("name") or entry["name"]
            source = _resolve_input(scope, node, entry, definitions, set())
            if source is None:  # fed by nothing (a muted node): a widget keeps its value, a link input stays unset
                continue
            inputs[name] = source[1] if source[0] is VALUE else [source[0], source[1]]
        prompt[scope.node_id(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                              "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


# ----------------------------------------------------------------------------- subgraphs
# A subgraph (frontends since 2025; 1.27.10, ComfyUI 0.3.64's own, makes them) is a graph of its own in
# workflow["definitions"]["subgraphs"]; a node whose type is a definition's id is an instance of it. Inside
# a definition, links from node -10 (its input node) read the instance's inputs by slot, and links into
# node -20 (its output node) are the instance's outputs. As the frontend's graphToPrompt
# (ExecutableNodeDTO) does, an instance's nodes get the ids of the instance path, "9:2" (node 2 in the
# subgraph of node 9), "10:9:2" nested; an instance input with no link takes the value of the widget
# promoted to the instance (its widgets_values, one per input that has a widget); a muted or bypassed
# instance leaves all its nodes out, and a bypassed one passes its inputs on.

class _Graph:
    """The nodes {id: node} and links {id: (origin id, origin slot, target id, target slot)} of the root
    graph or of one subgraph definition."""

    def __init__(self, data, definition=None):
        self.definition = definition
        self.name = None if definition is None else str(definition.get("name") or definition.get("id"))
        where = "workflow" if definition is None else f"subgraph {self.name!r}"
        self.nodes = {}
        for node in data.get("nodes") or []:
            if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
                raise WorkflowError(f"{where}: a node without an id and a type: {str(node)[:80]}")
            self.nodes[node["id"]] = node
        self.links = _links(data)


class _Scope:
    """One instance of a graph: the path of instance node ids from the root, the instance node (None for
    the root) and the scope it sits in."""

    def __init__(self, graph, path, instance, parent):
        self.graph, self.path, self.instance, self.parent = graph, path, instance, parent

    def node_id(self, node_id):
        return ":".join(str(part) for part in (*self.path, node_id))

    def enter(self, instance, definitions):
        graph = definitions[instance["type"]]
        if any(scope.graph is graph for scope in self.chain()):
            raise WorkflowError(f"subgraph {graph.name!r} contains itself (node {self.node_id(instance['id'])})")
        return _Scope(graph, (*self.path, instance["id"]), instance, self)

    def chain(self):
        scope = self
        while scope is not None:
            yield scope
            scope = scope.parent


def _subgraph_definitions(workflow):
    """{subgraph id: its _Graph} for every definition in the file, nested "definitions" included."""
    found, stack = {}, [workflow]
    while stack:
        for definition in ((stack.pop().get("definitions") or {}).get("subgraphs") or []):
            if not isinstance(definition, dict) or not isinstance(definition.get("id"), str):
                raise WorkflowError(f"workflow: a subgraph definition without an id: {str(definition)[:80]}")
            found[definition["id"]] = _Graph(definition, definition)
            stack.append(definition)
    return found


def _instances(scope, definitions):
    """(scope, node) for every node of the graph, the nodes of active subgraph instances in place of them."""
    for node in scope.graph.nodes.values():
        if node["type"] not in definitions:
            yield scope, node
        elif node.get("mode", 0) not in (MUTED, BYPASSED):
            yield from _instances(scope.enter(node, definitions), definitions)


def _describe(scope, node, definitions=None):
    """How a message names a node: its id, title and class (a subgraph instance: the subgraph's name); the
    subgraph it sits in."""
    title = f" {node['title']!r}" if node.get("title") and node["title"] != node["type"] else ""
    kind = node["type"]
    if definitions and kind in definitions:
        kind = f"subgraph {definitions[kind].name!r}"
    elif _looks_like_a_subgraph(kind):
        kind = f"subgraph {kind}, whose definition is not in the file"
    inside = f" in subgraph {scope.graph.name!r}" if scope.instance is not None else ""
    return f"node {scope.node_id(node['id'])}{title} ({kind}){inside}"


def _looks_like_a_subgraph(kind):
    parts = kind.split("-")
    return [len(p) for p in parts] == [8, 4, 4, 4, 12] and all(c in "0123456789abcdef" for c in "".join(parts))


def _links(graph):
    """{link id: (origin id, origin slot, target id, target slot)} from either link format (lists in 0.4,
    objects in 1.x and in subgraph definitions)."""
    found = {}
    for link in graph.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            found[link[0]] = tuple(link[1:5])
        elif isinstance(link, dict) and {"id", "origin_id", "origin_slot"} <= set(link):
            found[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("target_id"), link.get("target_slot"))
        else:
            raise WorkflowError(f"workflow: a link that is neither [id, from, slot, to, slot, type] nor an "
                                f"object: {str(link)[:80]}")
    return found


def _resolve_input(scope, node, entry, definitions, seen):
    """(node id, output slot) of the node that really feeds input `entry` of `node`, (VALUE, v) for a
    PrimitiveNode's value or a promoted widget's, or None when nothing does (a muted source, an
    unconnected pass-through or subgraph input without a widget)."""
    link_id = entry["link"]
    if (scope.path, link_id) in seen:
        raise WorkflowError(f"workflow: link {link_id} loops through Reroute, bypassed or subgraph nodes")
    seen.add((scope.path, link_id))
    if link_id not in scope.graph.links:
        raise WorkflowError(f"workflow: link {link_id} is used by an input but not in the links list")
    source_id, slot = scope.graph.links[link_id][:2]
    if source_id == SUBGRAPH_INPUT and scope.instance is not None:
        outer = _instance_inputs(scope)
        if slot >= len(outer):
            where = _describe(scope.parent, scope.instance, definitions)
            raise WorkflowError(f"{where}: link {link_id} reads input {slot} of a subgraph that has {len(outer)}")
        if outer[slot] is not None and outer[slot].get("link") is not None:
            return _resolve_input(scope.parent, scope.instance, outer[slot], definitions, seen)
        return _promoted_value(scope, slot)
    source = scope.graph.nodes.get(source_id)
    if source is None:
        raise WorkflowError(f"workflow: link {link_id} comes from node {scope.node_id(source_id)}, which is not in "
                            "the workflow")
    return _resolve_output(scope, source, slot, definitions, seen)


def _resolve_output(scope, source, slot, definitions, seen):
    if source["type"] == "PrimitiveNode":
        values = source.get("widgets_values") or []
        if not values:
            raise WorkflowError(f"node {scope.node_id(source['id'])} (PrimitiveNode): has no value")
        return VALUE, values[0]
    if source.get("mode", 0) == MUTED:
        return None
    if source["type"] == "Reroute" or source.get("mode", 0) == BYPASSED:
        entry = _pass_through_input(source, slot)
        return None if entry is None else _resolve_input(scope, source, entry, definitions, seen)
    if source["type"] in definitions:  # the inner node linked to the subgraph's output `slot`
        inner = scope.enter(source, definitions)
        links = [link for link in inner.graph.links.values() if link[2:4] == (SUBGRAPH_OUTPUT, slot)]
        if not links or links[0][0] not in inner.graph.nodes:
            return None
        return _resolve_output(inner, inner.graph.nodes[links[0][0]], links[0][1], definitions, seen)
    return scope.node_id(source["id"]), slot


def _instance_inputs(scope):
    """The instance's input entry for each input of its subgraph, None where the file leaves it out (the
    frontend drops unlinked widget inputs from the workflow it embeds in PNGs): matched by name and type,
    then by name, as the frontend matches them when it loads the file."""
    entries, taken, found = scope.instance.get("inputs") or [], set(), []
    for slot in scope.graph.definition.get("inputs") or []:
        free = [i for i in range(len(entries)) if i not in taken]
        match = next((i for i in free if (entries[i].get("name"), entries[i].get("type")) ==
                      (slot.get("name"), slot.get("type"))), None)
        if match is None:
            match = next((i for i in free if entries[i].get("name") == slot.get("name")), None)
        taken.add(match)
        found.append(None if match is None else entries[match])
    return found


def _promoted_slots(scope):
    """The subgraph's inputs that hold a promoted widget (linked to an inner widget input), in order."""
    promoted = set()
    for link_id, (origin, slot, target, _) in scope.graph.links.items():
        node = scope.graph.nodes.get(target)
        if origin == SUBGRAPH_INPUT and node is not None and any(
                entry.get("link") == link_id and entry.get("widget") for entry in node.get("inputs") or []):
            promoted.add(slot)
    return sorted(promoted)


def _promoted_value(scope, slot):
    """(VALUE, v) of the widget promoted to input `slot` of a subgraph instance, or None if it has none
    (the inner widget keeps its own value then).

    The instance's widgets_values hold one value per promoted input, in input order (files of some
    versions also keep a seed's control value after it; it is skipped)."""
    promoted = _promoted_slots(scope)
    if slot not in promoted:
        return None
    values = scope.instance.get("widgets_values") or []
    if isinstance(values, dict):
        return None
    if len(values) > len(promoted):
        values = [v for i, v in enumerate(values) if not (i and v in CONTROL_VALUES and isinstance(values[i - 1], int))]
    position = promoted.index(slot)
    if position >= len(values) or values[position] is None:
        return None
    return VALUE, values[position]


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


def _widget_inputs(node, cls, where):
    """{input name: value} for the node's widget inputs, read from widgets_values in declaration order."""
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
