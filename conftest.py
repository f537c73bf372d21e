"""pytest only: the repository root is a folder of files, not a package to import.

The root holds the pack's __init__.py (ComfyUI imports the folder as a package; `pip install -e .`
installs it as `ldm_nodes`). pytest would collect the root as a package and import that
__init__.py under the folder's own name, which fails in a clone named `ldm-nodes` (not an
identifier). Collected as a plain folder, it is never imported; the tests import the installed
`ldm_nodes`. The hook is registered as a plugin because pytest asks the root's parent, which this
conftest does not cover, how to collect the root.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


class RootIsAFolder:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    config.pluginmanager.register(RootIsAFolder(), "ldm-nodes-root-is-a-folder")
