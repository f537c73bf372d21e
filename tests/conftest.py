"""Shared test settings and reference data (tests/data/)."""
import json
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


class _RepositoryIsAFolder:
    """Collect the repository root as a plain folder, not as a package: pytest would import its
    __init__.py (the ComfyUI entry, relative imports only), which fails in a clone whose folder name
    is not a Python identifier, such as `git clone`'s own ldm-nodes. Tests import the installed
    package `ldm_nodes` instead."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == REPOSITORY:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RepositoryIsAFolder(), "ldm-nodes-repository-folder")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread runs them fastest, and far faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sd15_shapes():
    """{key: shape} of every tensor in a Stable Diffusion 1.5 single-file checkpoint (tests/data/sd15_keys.txt,
    one "key<TAB>[shape]" per line), a fresh dict per test."""
    rows = (line.split("\t") for line in (DATA / "sd15_keys.txt").read_text().splitlines())
    return {key: tuple(json.loads(shape)) for key, shape in rows}
