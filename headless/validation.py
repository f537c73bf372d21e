"""A workflow's graph as ComfyUI checks it: the nodes' declared inputs, links and their types,
widget values against their limits, VALIDATE_INPUTS, and the order to execute in.

Semantics (ComfyUI's execution.py): every node's class_type must be known; only the nodes that
output nodes (OUTPUT_NODE = True) need are validated and executed, each once, in dependency order,
and a workflow without an output node is refused. A list value is a link [node_id, output_index];
links are type-checked as ComfyUI does (equal, "*", or overlapping comma-separated names). Widget
values are checked for type (INT, FLOAT, BOOLEAN, STRING; stricter than ComfyUI, which would
coerce "12" to 12), finiteness (a FLOAT that is NaN or inf is refused even where a VALIDATE_INPUTS
takes it: every comparison with NaN is false, so no min/max would catch it), min/max and COMBO
membership, except for the inputs a VALIDATE_INPUTS
classmethod takes, which ComfyUI leaves to it (linked ones arrive as None); a string it returns is
an error, and it should name the input in it ("ckpt_name: ..."). Input names a class does not
declare are ignored; optional inputs are passed only when given; hidden inputs PROMPT,
EXTRA_PNGINFO and UNIQUE_ID are filled in; FLOAT widgets get floats (JSON writes 7.0 as 7).
Unlike ComfyUI, which still runs the outputs that validate, any problem stops the whole run, and
a link from an undeclared input does not make its source run.
"""
import inspect
import math

from .session import session
from .standins import STAND_INS

PRIMITIVES = {"INT": ((int,), "an integer"), "FLOAT": ((int, float), "a number"),
              "BOOLEAN": ((bool,), "true or false"), "STRING": ((str,), "a string")}


class WorkflowError(Exception):
    """A workflow that cannot run: unreadable file, bad override, invalid graph or failing node."""


MAX_LISTED = 50  # problems shown in a ValidationError's message (all are in .errors)


class ValidationError(WorkflowError):
    """Every problem found before running; `errors` holds one line per problem."""

    def __init__(self, errors):
        self.errors = list(errors)
        if len(self.errors) == 1:  # one problem, one line
            super().__init__(f"invalid workflow: {self.errors[0]}")
            return
        shown = [f"  {e}" for e in self.errors[:MAX_LISTED]]
        if len(self.errors) > MAX_LISTED:
            shown.append(f"  ... and {len(self.errors) - MAX_LISTED} more")
        super().__init__(f"invalid workflow ({len(self.errors)} problems):\n" + "\n".join(shown))


class NodeError(WorkflowError):
    """A node that raised while running (the original exception is chained as __cause__)."""

    def __init__(self, node_id, class_type, message):
        self.node_id, self.class_type = node_id, class_type
        super().__init__(f"node {node_id} ({class_type}): {message}")


# ----------------------------------------------------------------------------- node declarations

def _inputs(node):
    return node.get("inputs", {})


def input_specs(cls):
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


def call_kwargs(node_id, node, cls, results):
    """Keyword arguments for the node's function; linked inputs are None when `results` is None."""
    kwargs = {}
    for name, (kind, _, _) in input_specs(cls).items():
        if name not in _inputs(node):
            continue
        value = _inputs(node)[name]
        if _is_link(value):
            kwargs[name] = None if results is None else results[str(value[0])][value[1]]
        else:
            kwargs[name] = float(value) if kind == "FLOAT" else value
    for name, kind in _hidden_specs(cls).items():
        kwargs[name] = session().hidden(kind, node_id)
    return kwargs


# ----------------------------------------------------------------------------- validation

def validate_graph(prompt, registry):
    """The ids of the nodes to execute, in order; ValidationError listing every problem otherwise."""
    if not isinstance(prompt, dict):
        raise ValidationError(["workflow: expected a JSON object mapping node ids to nodes"])
    if not any(_is_output(node, registry) for node in prompt.values()):  # first: nothing else is worth checking
        raise ValidationError(["workflow: no output node (SaveImage, PreviewImage or another node with "
                               "OUTPUT_NODE = True); ComfyUI refuses such a workflow too"])
    classes, errors = _known_classes(prompt, registry)
    outputs = sorted((i for i, cls in classes.items() if getattr(cls, "OUTPUT_NODE", False) is True), key=_id_order)
    order, cycle_errors = _execution_order(outputs, prompt, classes)
    for node_id in order:
        errors += _node_problems(node_id, prompt, classes)
    errors += cycle_errors
    if errors:
        raise ValidationError(errors)
    return order


def _is_output(node, registry):
    class_type = node.get("class_type") if isinstance(node, dict) else None
    return isinstance(class_type, str) and getattr(registry.get(class_type), "OUTPUT_NODE", False) is True


def _known_classes(prompt, registry):
    classes, errors = {}, []
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str) or not isinstance(_inputs(node), dict):
            errors.append(f"node {node_id}: expected {{\"class_type\": ..., \"inputs\": {{...}}}}")
        elif class_type not in registry:
            errors.append(f"node {node_id} ({class_type}): no such node; headless runs know only this pack's nodes "
                          f"and the stand-ins {', '.join(STAND_INS)}")
        else:
            classes[node_id] = registry[class_type]
    return classes, errors


def _id_order(node_id):
    """Numeric ids first, in numeric order (compared as digit strings: no int() of a huge id), then the rest."""
    if node_id.isascii() and node_id.isdigit():
        digits = node_id.lstrip("0")
        return (0, len(digits), digits)
    return (1, 0, node_id)


def _links(node, cls):
    """(input name, source node id) for the declared inputs that are links."""
    specs = input_specs(cls)
    return [(name, str(value[0])) for name, value in _inputs(node).items() if name in specs and _is_link(value) and value]


def _execution_order(outputs, prompt, classes):
    """Depth-first from the output nodes: (the nodes they need, dependencies first; cycle errors).

    Iterative, with an explicit stack, so a chain of thousands of nodes needs no recursion. Written by
    hand rather than with graphlib: each output's dependencies run before the next output's (so SaveImage
    files are numbered in the outputs' order), and every cycle is named with the input that closes it."""
    order, state, errors = [], {}, []
    for output in outputs:
        if output in state:
            continue
        state[output] = "open"
        path = [output]  # the nodes from the output down to the one on top of the stack
        stack = [iter(_links(prompt[output], classes[output]))]
        while stack:
            node_id = path[-1]
            for name, source in stack[-1]:
                if state.get(source) == "open":
                    cycle = " -> ".join(path[path.index(source):] + [source])
                    errors.append(f"{_where(node_id, prompt, name)}: dependency cycle {cycle}")
                elif source in classes and source not in state:
                    state[source] = "open"
                    path.append(source)
                    stack.append(iter(_links(prompt[source], classes[source])))
                    break
            else:
                stack.pop()
                state[path.pop()] = "done"
                order.append(node_id)
    return order, errors


def _where(node_id, prompt, name=None):
    text = f"node {node_id} ({prompt[node_id]['class_type']})"
    return f"{text} input {name!r}" if name else text


def _node_problems(node_id, prompt, classes):
    node, cls = prompt[node_id], classes[node_id]
    specs = input_specs(cls)
    validated_by_node = _validator_inputs(cls, specs)
    errors = []
    for name, (kind, options, category) in specs.items():
        if name not in _inputs(node):
            problem = "required input is missing" if category == "required" else None
        elif _is_link(_inputs(node)[name]):
            problem = _link_problem(_inputs(node)[name], kind, prompt, classes)
        else:
            value = _inputs(node)[name]
            problem = _finite_problem(value, kind) or _value_problem(value, kind, options, name not in validated_by_node)
        if problem:
            errors.append(f"{_where(node_id, prompt, name)}: {problem}")
    if validated_by_node and not errors:
        errors += _custom_problems(node_id, prompt, cls, validated_by_node)
    return errors


def _link_problem(link, kind, prompt, classes):
    if len(link) != 2 or not isinstance(link[0], (str, int)) or type(link[1]) is not int:
        return f"bad link {_short(link)}: expected [node_id, output_index]"
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
        return None if not check_limits or value in combo else f"{_short(value)} is not one of {_shorten(combo)}"
    if kind == "*":
        return None
    if kind not in PRIMITIVES:
        return f"must be linked to an output of type {kind}, not set to {_short(value)}"
    types, description = PRIMITIVES[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "BOOLEAN"):
        return f"expects {description}, got {_short(value)}"
    return _range_problem(value, options) if check_limits and kind in ("INT", "FLOAT") else None


def _finite_problem(value, kind):
    """A FLOAT must be a finite number (JSON's NaN and Infinity parse, and 1e400 overflows to inf)."""
    if kind != "FLOAT" or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        finite = False
    return None if finite else f"{_short(value)} is not a finite number"


def _short(value, limit=80):
    """repr(value) cut to `limit` characters, so a huge input does not make a huge message."""
    if isinstance(value, int) and value.bit_length() > 3 * limit:  # repr of a huge int is slow, or refused
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _range_problem(value, options):
    if "min" in options and value < options["min"]:
        return f"{_short(value)} is below the minimum {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{_short(value)} is above the maximum {options['max']}"
    return None


def _shorten(options):
    return repr(options) if len(options) <= 20 else repr(options[:20])[:-1] + f", ...] ({len(options)} options)"


def _custom_problems(node_id, prompt, cls, names):
    kwargs = call_kwargs(node_id, prompt[node_id], cls, None)
    try:
        verdict = cls.VALIDATE_INPUTS(**{k: v for k, v in kwargs.items() if k in names})
    except Exception as error:  # a validator's own bug is reported like a failed check
        return [f"{_where(node_id, prompt)}: VALIDATE_INPUTS raised {type(error).__name__}: {error}"]
    if verdict is True:
        return []
    return [f"{_where(node_id, prompt)}: {verdict if verdict is not False else 'VALIDATE_INPUTS failed'}"]
