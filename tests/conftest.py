"""Shared test settings and reference data (tests/data/)."""
import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"


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
