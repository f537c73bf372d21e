"""The layering rules of docs/ARCHITECTURE.md, checked on the source: imports point one way
(core <- nodes <- the entry points), there is no import circle, and no module is long without
saying why at its top."""
import ast
from pathlib import Path

import ldm_nodes

PACK = Path(ldm_nodes.__file__).resolve().parent
PACKAGES = ("core", "nodes", "tools")
# The layers, lowest first; a module may import from its own layer and the ones below. model_paths
# (the model folders and names the loader node resolves) belongs to the node layer.
LAYERS = {"core": 0, "nodes": 1, "model_paths": 1}
TOP = 2  # the entry points: __init__ (ComfyUI's), __main__, runner, validation, standins, routes, comfy_host
LONG = 400  # lines; a longer module says why in a "Why this file is long:" line of its docstring


def modules(pack=PACK):
    """{dotted name relative to the pack ("" is the pack itself): path} for the package's modules."""
    found = {}
    for path in [*pack.glob("*.py"), *(p for package in PACKAGES for p in (pack / package).glob("*.py"))]:
        parts = path.relative_to(pack).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(name, level, importer, is_package):
    """The pack-relative module a relative import names; None for an absolute (outside) import."""
    if level == 0:
        return None
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def imports(known):
    """{module: set of pack modules it imports, anywhere in its body}."""
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, name, path.name == "__init__.py")
                if base is None:
                    continue
                for alias in node.names:  # `from . import runner` names a module; `from .x import f` names x
                    child = f"{base}.{alias.name}" if base else alias.name
                    targets.add(child if child in known else base)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def layer(name):
    return LAYERS.get(name.split(".")[0], TOP)


def layer_breaches(graph):
    return [f"{name} imports {target}" for name, targets in sorted(graph.items()) for target in sorted(targets)
            if layer(target) > layer(name)]


def import_circles(graph):
    state, cycles = {}, []
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path, state[start] = [start], "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                cycles.append(path[path.index(child):] + [child])
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return [" -> ".join(c) for c in cycles]


def test_imports_point_one_way_core_then_nodes_then_the_entry_points():
    assert not layer_breaches(imports(modules()))


def test_no_import_circle():
    assert not import_circles(imports(modules()))


def test_the_checker_finds_a_circle_and_a_layer_breach(tmp_path):
    """The two tests above can fail: a made-up pack with core -> nodes -> core."""
    (tmp_path / "core").mkdir()
    (tmp_path / "nodes").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "nodes" / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("def f():\n    from ..nodes import b\n")
    (tmp_path / "nodes" / "b.py").write_text("from ..core.a import f\n")
    graph = imports(modules(tmp_path))
    assert import_circles(graph) == ["core.a -> nodes.b -> core.a"]
    assert layer_breaches(graph) == ["core.a imports nodes.b"]


def test_long_modules_say_why():
    unexplained = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG and "Why this file is long:" not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(PACK)} ({text.count(chr(10))} lines)")
    assert not unexplained, unexplained
