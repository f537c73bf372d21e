"""The layering rules of docs/ARCHITECTURE.md, checked on the source: imports point one way
(core <- nodes <- headless <- cli and the entry points), every import form counts (relative,
absolute `ldm_nodes.x`, `import a.b`, imports inside functions, importlib.import_module("...")),
each layer imports only the outside packages it is allowed, there is no import circle, and no
module is long without saying why at its top."""
import ast
import graphlib
import sys
from pathlib import Path

import ldm_nodes

PACK = Path(ldm_nodes.__file__).resolve().parent
PACKAGE = "ldm_nodes"
PACKAGES = ("core", "nodes", "headless", "cli", "tools")
# The layers, lowest first; a module may import from its own layer and the ones below. The root's
# __init__ (ComfyUI's entry) and __main__, and tools/ (test and benchmark support), are the top.
LAYERS = {"core": 0, "nodes": 1, "headless": 2, "cli": 3}
TOP = 4
# Outside packages each layer may import besides the standard library (each layer also those below).
THIRD_PARTY = {0: {"torch", "numpy", "PIL", "safetensors", "einops",
                   "psutil"},  # optional: the memory figure where /proc is missing (ComfyUI installs it)
               1: {"comfy", "server", "folder_paths", "aiohttp"},  # the ComfyUI glue: host, model folders, route
               2: set(), 3: set(), TOP: {"diffusers", "transformers"}}
LONG = 400  # lines; a longer module says why in a "Why this file is long:" line of its docstring


def modules(pack=PACK):
    """{dotted name relative to the pack ("" is the pack itself): path} for the package's modules."""
    found = {}
    for path in [*pack.glob("*.py"), *(p for package in PACKAGES for p in (pack / package).rglob("*.py"))]:
        if path.name == "conftest.py":  # pytest's, not the pack's
            continue
        parts = path.relative_to(pack).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(name, level, importer, is_package):
    """The pack-relative module a relative import names."""
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def _absolute(name):
    """("pack", pack-relative name) for `ldm_nodes...`, else ("outside", top-level package)."""
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return "pack", name[len(PACKAGE) + 1:]
    return "outside", name.split(".")[0]


def _imported_names(node, name, is_package):
    """Every (kind, target) one AST node imports: kind "pack" (a pack-relative module, possibly a
    name inside it) or "outside" (a top-level package)."""
    if isinstance(node, ast.Import):
        return [_absolute(alias.name) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            kind, base = _absolute(node.module)
            if kind == "outside":
                return [(kind, base)]
        else:
            base = _resolve(node.module, node.level, name, is_package)
        # `from . import runner` names a module; `from .x import f` names x (resolved against the modules)
        return [("pack", f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    if isinstance(node, ast.Call):  # importlib.import_module("ldm_nodes.x"), __import__("comfy")
        function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if function in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            return [_absolute(node.args[0].value)]
    return []


def imports(known):
    """({module: set of pack modules it imports}, {module: set of outside packages it imports}),
    anywhere in its body."""
    graph, outside = {}, {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets, packages = set(), set()
        for node in ast.walk(tree):
            for kind, target in _imported_names(node, name, path.name == "__init__.py"):
                if kind == "outside":
                    packages.add(target)
                    continue
                while target and target not in known:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                targets.add(target)
        graph[name] = {t for t in targets if t in known and t != name}
        outside[name] = packages
    return graph, outside


def layer(name):
    return LAYERS.get(name.split(".")[0], TOP)


def layer_breaches(graph):
    return [f"{name} imports {target}" for name, targets in sorted(graph.items()) for target in sorted(targets)
            if layer(target) > layer(name)]


def outside_breaches(outside):
    """Imports of packages that are neither the standard library nor allowed in the module's layer."""
    breaches = []
    for name, packages in sorted(outside.items()):
        allowed = set().union(*(THIRD_PARTY[level] for level in THIRD_PARTY if level <= layer(name)))
        breaches += [f"{name} imports {package}" for package in sorted(packages)
                     if package not in sys.stdlib_module_names and package not in allowed]
    return breaches


def import_circle(graph):
    """One import circle as "a -> b -> a", or None (graphlib finds it)."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return " -> ".join(reversed(error.args[1]))  # graphlib lists it importee first
    return None


def test_imports_point_one_way_core_nodes_headless_cli():
    graph, outside = imports(modules())
    assert not layer_breaches(graph)
    assert not outside_breaches(outside)


def test_no_import_circle():
    assert import_circle(imports(modules())[0]) is None


def test_every_package_is_checked():
    """A new package of the pack must be placed in a layer here (else its imports go unchecked)."""
    folders = {p.parent.name for p in PACK.glob("*/__init__.py")}
    assert folders == set(PACKAGES), folders


def _made_up_pack(tmp_path, files):
    for rel, text in {"__init__.py": "", "core/__init__.py": "", "nodes/__init__.py": "",
                      "headless/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return imports(modules(tmp_path))


def test_the_checker_finds_a_circle_and_a_layer_breach(tmp_path):
    """The tests above can fail: a made-up pack with core -> nodes -> core."""
    graph, _ = _made_up_pack(tmp_path, {"core/a.py": "def f():\n    from ..nodes import b\n",
                                        "nodes/b.py": "from ..core.a import f\n"})
    assert import_circle(graph) in ("core.a -> nodes.b -> core.a", "nodes.b -> core.a -> nodes.b")
    assert layer_breaches(graph) == ["core.a imports nodes.b"]


def test_the_checker_reads_every_import_form(tmp_path):
    """Absolute imports of the pack, `import a.b`, deferred imports, importlib, and outside packages."""
    graph, outside = _made_up_pack(tmp_path, {
        "core/a.py": "import ldm_nodes.nodes\n",
        "core/b.py": "def f():\n    from ldm_nodes.headless.runner import run\n",
        "core/c.py": "import importlib\nimportlib.import_module('ldm_nodes.nodes.d')\n",
        "core/e.py": "import comfy.model_management\nimport os, json\n",
        "nodes/d.py": "import aiohttp\n",
        "headless/runner.py": "def run(): pass\n",
    })
    assert layer_breaches(graph) == ["core.a imports nodes", "core.b imports headless.runner",
                                     "core.c imports nodes.d"]
    assert outside_breaches(outside) == ["core.e imports comfy"]


def test_long_modules_say_why():
    unexplained = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG and "Why this file is long:" not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(PACK)} ({text.count(chr(10))} lines)")
    assert not unexplained, unexplained
