"""Mutation testing of the math modules: does each module's own test file notice a small wrong edit?

    python -m ldm_nodes.tools.mutate [--module core/schedule.py ...] [--sample N] [--seed S]
                                     [--timeout SECONDS] [--out results.jsonl] [--list]

Each mutant is one edit of the module's syntax tree: an arithmetic operator swapped (+ -, * /, ** *,
// /), a comparison swapped (< <=, > >=, == !=, < >), a number changed (n -> n + 1, x -> 2x, 0 -> 1), a
unary minus dropped, or the first two positional arguments of a call swapped. The pack is copied into a
temporary folder, the mutated module is written there, and the module's test files run against the copy
(`pytest -x`, OMP_NUM_THREADS=1, a per-mutant timeout). A mutant is killed when the tests fail (or time
out), and survives when they pass. Surviving mutants are printed with their line; each needs a new test
or a line saying why it cannot change a result (bench/RESULTS.md keeps the triage).

Slow (tens of seconds per mutant on two cores): not part of CI. `--sample N` runs N mutants drawn at
random (seeded) across the chosen modules; results are appended one line each to --out as they finish,
so a run cut short still has a score for what ran.
"""
import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]

# Each math module and the test files that are its own.
MODULES = {
    "core/schedule.py": ["tests/test_schedule.py"],
    "core/samplers.py": ["tests/test_samplers.py"],
    "core/objective.py": ["tests/test_objective.py"],
    "core/likelihood.py": ["tests/test_likelihood.py"],
    "core/denoiser.py": ["tests/test_denoiser.py"],
    "core/inpaint.py": ["tests/test_inpaint.py", "tests/test_inpaint_parity.py"],
}

BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
               ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv}
COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                 ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
                 ast.In: ast.NotIn, ast.NotIn: ast.In}


def _docstring_nodes(tree):
    """The string constants that are docstrings (never mutated; strings are not mutated at all)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                out.add(id(node.body[0].value))
    return out


def _number_mutation(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value == 0.0:
        return 1.0
    return value * 2.0


def _annotation_nodes(tree):
    """Nodes inside type annotations: mutating them changes nothing at run time."""
    out = set()
    for node in ast.walk(tree):
        anns = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            anns.append(node.returns)
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None:
                    anns.append(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            anns.append(node.annotation)
        for ann in anns:
            if ann is not None:
                out.update(id(n) for n in ast.walk(ann))
    return out


def mutants(source):
    """Every mutant of `source`: a list of (index, line, description). Index i is the i-th site in
    ast.walk order; `apply(source, i)` makes that mutant's source."""
    tree = ast.parse(source)
    return [(i, line, what) for i, (line, what, _) in enumerate(_sites(tree))]


def _sites(tree):
    skip = _docstring_nodes(tree) | _annotation_nodes(tree)
    sites = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP_SWAPS:
            new = BINOP_SWAPS[type(node.op)]
            sites.append((node.lineno, f"{type(node.op).__name__} -> {new.__name__}",
                          lambda n=node, new=new: setattr(n, "op", new())))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in COMPARE_SWAPS:
                    new = COMPARE_SWAPS[type(op)]
                    sites.append((node.lineno, f"{type(op).__name__} -> {new.__name__}",
                                  lambda n=node, k=k, new=new: n.ops.__setitem__(k, new())))
                if type(op) in (ast.Lt, ast.Gt):
                    new = ast.Gt if type(op) is ast.Lt else ast.Lt
                    sites.append((node.lineno, f"{type(op).__name__} -> {new.__name__}",
                                  lambda n=node, k=k, new=new: n.ops.__setitem__(k, new())))
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, complex):
            new = _number_mutation(node.value)
            sites.append((node.lineno, f"{node.value!r} -> {new!r}",
                          lambda n=node, new=new: setattr(n, "value", new)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sites.append((node.lineno, "drop unary minus", None))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 \
                and not any(isinstance(a, ast.Starred) for a in node.args[:2]) \
                and ast.dump(node.args[0]) != ast.dump(node.args[1]):
            sites.append((node.lineno, "swap first two arguments",
                          lambda n=node: n.args.__setitem__(slice(0, 2), [n.args[1], n.args[0]])))
    return sites


class _DropMinus(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return node.operand if node is self.target else node


def apply(source, index):
    """The source of mutant `index` (the module is re-emitted by ast.unparse: comments are gone, the
    code is the same but for the one edit)."""
    tree = ast.parse(source)
    sites = _sites(tree)
    line, what, edit = sites[index]
    if edit is None:  # drop a unary minus: the UnaryOp node is replaced by its operand
        target = [n for n in ast.walk(tree) if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub)
                  and n.lineno == line]
        # the site list and this walk visit nodes in the same order: pick the same one
        unary_sites = [i for i, (l, w, e) in enumerate(sites) if e is None and l == line]
        tree = _DropMinus(target[unary_sites.index(index)]).visit(tree)
    else:
        edit()
    return ast.unparse(ast.fix_missing_locations(tree))


def _copy_pack(dest):
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(PACK, dest, ignore=ignore, symlinks=True)  # a real copy: model paths must resolve inside it


def _run_tests(root, tests, timeout):
    env = dict(os.environ, PYTHONPATH=str(root.parent), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        status = "survived" if proc.returncode == 0 else "killed"
        if proc.returncode not in (0, 1):  # 2: collection/import error, also a kill, but say so
            status = "killed" if proc.returncode == 2 else status
    except subprocess.TimeoutExpired:
        status = "timeout"
    return status, time.monotonic() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", choices=sorted(MODULES),
                    help="a module to mutate (repeatable; default: all six)")
    ap.add_argument("--sample", type=int, default=0, help="run only N mutants drawn at random (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=0,
                    help="seconds per mutant (default: 3 x the unmutated run + 30)")
    ap.add_argument("--out", type=Path, help="append one JSON line per mutant here")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", metavar="MODULE:INDEX",
                    help="run only this mutant (repeatable), e.g. to recheck survivors after adding tests")
    args = ap.parse_args(argv)
    modules = args.module or sorted(MODULES)
    todo = []
    for m in modules:
        src = (PACK / m).read_text()
        todo += [(m, i, line, what) for i, line, what in mutants(src)]
    print(f"{len(todo)} mutants in {len(modules)} modules", flush=True)
    if args.list:
        for m, i, line, what in todo:
            print(f"{m}:{line} #{i} {what}")
        return 0
    if args.only:
        wanted = {(m, int(i)) for m, i in (o.rsplit(":", 1) for o in args.only)}
        modules = sorted({m for m, _ in wanted})
        todo = [t for t in todo if (t[0], t[1]) in wanted]
    random.Random(args.seed).shuffle(todo)
    if args.sample:
        todo = todo[:args.sample]
    done = set()
    if args.out and args.out.exists():  # resume: skip what a previous run of the same command did
        for rec in map(json.loads, args.out.read_text().splitlines()):
            done.add((rec["module"], rec["index"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ldm_nodes"
        _copy_pack(root)
        timeouts = {}
        for m in modules:
            status, secs = _run_tests(root, MODULES[m], timeout=1800)
            if status != "survived":
                print(f"the unmutated tests of {m} fail in the copy: fix that first", file=sys.stderr)
                return 2
            timeouts[m] = args.timeout or 3 * secs + 30
            print(f"{m}: unmutated tests pass in {secs:.0f} s; timeout {timeouts[m]:.0f} s", flush=True)
        counts = {"killed": 0, "survived": 0, "timeout": 0}
        for m, i, line, what in todo:
            if (m, i) in done:
                continue
            original = (root / m).read_text()
            (root / m).write_text(apply(original, i))
            try:
                status, secs = _run_tests(root, MODULES[m], timeouts[m])
            finally:
                (root / m).write_text(original)
            counts[status] += 1
            rec = {"module": m, "index": i, "line": line, "mutation": what, "status": status,
                   "seconds": round(secs, 1)}
            print(json.dumps(rec), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
    ran = sum(counts.values())
    if ran:
        killed = counts["killed"] + counts["timeout"]
        print(f"score: {killed}/{ran} killed ({100 * killed / ran:.0f}%); {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
