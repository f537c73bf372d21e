"""A new contributor's first steps: `git clone` makes a folder named ldm-nodes, and the README's
test command must pass there, from the clone's root and from its tests/ folder; and what the
ComfyUI registry and an installer read (pyproject's [tool.comfy], one dependency list).

The folder name is no Python identifier, so nothing may import the root __init__.py as a module
of that name (conftest.py collects the root as a plain folder). The clone's package is what the
subprocess imports: a PYTHONPATH folder holds `ldm_nodes`, a link to the clone, as
`pip install -e .` would map it.
"""
import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    root = tmp_path_factory.mktemp("newcomer")
    subprocess.run(["git", "clone", "-q", str(REPOSITORY), str(root / "ldm-nodes")], check=True, timeout=120)
    (root / "path").mkdir()
    try:
        (root / "path" / "ldm_nodes").symlink_to(root / "ldm-nodes", target_is_directory=True)
    except OSError as error:
        pytest.skip(f"cannot create a symlink here: {error}")
    env = {**os.environ, "PYTHONPATH": str(root / "path")}
    return root / "ldm-nodes", env


def _run(command, cwd, env):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_clone_imports_its_own_package(clone):
    folder, env = clone
    spec = _run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('ldm_nodes').origin)"],
                folder, env)
    assert Path(spec.stdout.strip()).resolve() == (folder / "__init__.py").resolve(), spec.stderr


@pytest.mark.parametrize("where, tests", [(".", ["tests/test_schedule.py"]), ("tests", ["test_schedule.py"])])
def test_pytest_passes_in_a_clone_named_ldm_nodes(clone, where, tests):
    folder, env = clone
    result = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *tests], folder / where, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "error" not in result.stdout.lower()


# ---------------------------------------------------------------------------------------------
# What the registry and an installer read


def pyproject():
    return tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_registry_section_names_publisher_name_and_an_icon_in_the_repository():
    comfy = pyproject()["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = comfy["Icon"].split("/main/", 1)[1]  # the raw URL of a file on the default branch
    with Image.open(REPOSITORY / icon) as image:
        assert image.size[0] == image.size[1] >= 64


def imported_modules():
    """Top-level names of the modules the pack's own code imports (tests and benchmarks aside)."""
    names = set()
    for path in [*REPOSITORY.glob("*.py"), *REPOSITORY.glob("core/*.py"), *REPOSITORY.glob("nodes/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_one_dependency_list_and_each_dependency_is_used():
    dependencies = pyproject()["project"]["dependencies"]
    lines = (REPOSITORY / "requirements.txt").read_text().splitlines()
    assert [line for line in lines if line.strip() and not line.startswith("#")] == dependencies
    assert not {"torch", "torchvision", "torchaudio"} & set(dependencies)  # ComfyUI brings its own builds
    modules = {"pillow": "PIL"}
    used = imported_modules()
    assert [d for d in dependencies if modules.get(d, d) not in used] == []
