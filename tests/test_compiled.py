"""The denoiser compiled ahead of time for the CPU (core/compiled.py): the same numbers as the float64
network, one package per shapes and weights, built once and then loaded from disk, and eager sampling
with a warning wherever no package can be built.

One test compiles a real package (about 30 s on two cores; it needs the C++ compiler torch's inductor
uses, which .ci/run installs; where there is none it is skipped with the reason). The others stand in
for the build, so what they check (keys, the per-network cache, the fallback) costs nothing.
"""
import copy
import shutil
import warnings

import pytest
import torch

from ldm_nodes.core import compiled
from ldm_nodes.core.accel import PrepackedConv2d, fast_network
from ldm_nodes.core.transformer import TransformerConfig, TransformerModel
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.tools.randomise import randomise

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), transformer_depth=1, context_dim=64, num_head_channels=16)
TRANSFORMER = TransformerConfig(in_channels=4, out_channels=4, width=64, depth=2, heads=4, context_dim=64,
                                base_size=8)


def inputs(batch=2, size=8, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.linspace(10.3, 937.7, batch),
            torch.randn(batch, tokens, 64, generator=g))


def frozen(net):
    """A loaded model's network: weights without gradients (so cpu_layout prepacks its convolutions)."""
    return randomise(net).requires_grad_(False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled._PACKAGES.clear()
    return tmp_path / "ldm-nodes" / "compiled"


def has_compiler():
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return shutil.which(get_cpp_compiler()) is not None
    except Exception:  # noqa: BLE001 - no usable compiler, whatever the reason
        return False


@pytest.mark.skipif(not has_compiler(), reason="no C++ compiler for torch's inductor (.ci/run installs g++)")
def test_a_compiled_network_matches_the_float64_network_and_is_built_once(cache, monkeypatch):
    net = frozen(UNetModel(UNET))
    x, t, c = inputs()
    with torch.inference_mode():
        reference = copy.deepcopy(net).double()(x.double(), t, c.double())
        notes = []
        out = fast_network(net, compiled=True, note=notes.append)(x, t, c)
    assert [p.suffix for p in cache.iterdir()] == [".so"], list(cache.iterdir())  # nothing else left there
    assert any("compiling the denoiser" in n for n in notes), notes
    state = compiled._PACKAGES[net]
    assert state.failure is None and len(state.runners) == 1  # the package ran, not the eager fallback
    drift = ((out.double() - reference).abs().max() / reference.abs().max()).item()
    assert out.dtype == torch.float32 and drift <= 1e-5, drift

    # a new process (no packages in memory) loads the package from disk instead of building it again
    compiled._PACKAGES.clear()
    monkeypatch.setattr(compiled, "build_package", lambda *a: pytest.fail("built again"))
    with torch.inference_mode():
        again = fast_network(net, compiled=True)(x, t, c)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert len(compiled._PACKAGES[net].runners) == 1


def stand_in_build(monkeypatch, net, built):
    """build_package replaced by a note of what was asked, and the C++ runner of a package by `net` doubled
    (so a result from the stand-in package is told from the eager one)."""
    def build(network, inputs, path):
        built.append([tuple(a.shape) for a in inputs])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stand-in")

    class StandIn:
        def __init__(self, path, models):
            assert models == 1

        def run(self, inputs):
            return [net(*inputs) * 2]
    monkeypatch.setattr(compiled, "build_package", build)
    monkeypatch.setattr(torch._C._aoti, "AOTIModelContainerRunnerCpu", StandIn)


def test_one_package_per_input_shapes_and_none_built_twice(cache, monkeypatch):
    net = frozen(UNetModel(UNET))
    built = []
    stand_in_build(monkeypatch, net, built)
    with torch.inference_mode():
        for batch, size, tokens in ((2, 8, 7), (2, 8, 7), (1, 8, 7), (2, 16, 7), (2, 8, 77), (2, 8, 7)):
            x, t, c = inputs(batch, size, tokens)
            out = fast_network(net, compiled=True)(x, t, c)
            torch.testing.assert_close(out, 2 * net(x, t, c))
    assert built == [[(2, 4, 8, 8), (2,), (2, 7, 64)], [(1, 4, 8, 8), (1,), (1, 7, 64)],
                     [(2, 4, 16, 16), (2,), (2, 7, 64)], [(2, 4, 8, 8), (2,), (2, 77, 64)]]
    assert len(list(cache.glob("*.so"))) == 4


def test_changed_weights_get_their_own_packages(cache, monkeypatch):
    net = frozen(UNetModel(UNET))
    built = []
    stand_in_build(monkeypatch, net, built)
    x, t, c = inputs()
    with torch.inference_mode():
        fast_network(net, compiled=True)(x, t, c)
    with torch.no_grad():
        net.out[2].bias.add_(1.0)  # in place: same memory, new version
    with torch.inference_mode():
        fast_network(net, compiled=True)(x, t, c)
        fast_network(net, compiled=True)(x, t, c)
    assert len(built) == 2 and len(set(cache.glob("*.so"))) == 2


def test_without_a_package_sampling_runs_eagerly_and_says_why_once(monkeypatch):
    net = frozen(UNetModel(UNET))
    tries = []

    def no_compiler(network, inputs, path):
        tries.append(path)
        raise RuntimeError("Compiler g++ is not found\nmore lines")
    monkeypatch.setattr(compiled, "build_package", no_compiler)
    x, t, c = inputs()
    notes = []
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fast_network(net, compiled=True, note=notes.append)(x, t, c)
        second = fast_network(net, compiled=True, note=notes.append)(*inputs(batch=1))
        eager = net(x, t, c)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    assert second.shape == (1, 4, 8, 8) and len(tries) == 1
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "RuntimeError: Compiler g++ is not found" in said[0] and "more lines" not in said[0]
    assert notes[-1] == said[0]


def test_a_build_that_would_not_fit_in_memory_is_not_started(monkeypatch):
    net = frozen(UNetModel(UNET))
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    monkeypatch.setattr(compiled, "build_package", lambda *a: pytest.fail("a build was started"))
    monkeypatch.setattr("ldm_nodes.core.memory.available_memory",
                        lambda device: (compiled.BUILD_MEMORY + compiled.BUILD_WEIGHT_COPIES * weights - 1, "MemAvailable"))
    notes = []
    x, t, c = inputs()
    with torch.inference_mode(), pytest.warns(UserWarning, match="MemoryError: compiling needs about 1.0 GB and "
                                                                 "MemAvailable is 1.0 GB"):
        out = fast_network(net, compiled=True, note=notes.append)(x, t, c)
        torch.testing.assert_close(out, net(x, t, c), rtol=0, atol=0)
    assert len(notes) == 1 and "sampling eagerly" in notes[0]


def test_the_key_names_shapes_dtypes_weights_and_network():
    unet = frozen(UNetModel(UNET))
    x, t, c = inputs()
    weights = compiled.weights_digest(unet)
    key = compiled.package_key(unet, weights, (x, t, c))
    assert key == compiled.package_key(unet, compiled.weights_digest(copy.deepcopy(unet)), inputs(seed=1))
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.out[2].weight[0, 0, 0, 0] += 1e-3
    variants = [
        compiled.package_key(unet, weights, inputs(batch=1)),
        compiled.package_key(unet, weights, inputs(size=16)),
        compiled.package_key(unet, weights, inputs(tokens=77)),
        compiled.package_key(unet, weights, (x, t, c.bfloat16())),
        compiled.package_key(unet, compiled.weights_digest(other), (x, t, c)),
        compiled.package_key(unet, compiled.weights_digest(copy.deepcopy(unet).bfloat16()), (x, t, c)),
        compiled.package_key(frozen(TransformerModel(TRANSFORMER)), weights, (x, t, c)),
    ]
    assert len({key, *variants}) == 1 + len(variants)


@pytest.mark.parametrize("make", [lambda: UNetModel(UNET), lambda: TransformerModel(TRANSFORMER)], ids=["unet", "dit"])
def test_the_exported_copy_is_plain_and_computes_the_same(make):
    """Export gets ordinary modules and tensors: no prepacked oneDNN weights, no inference tensors."""
    with torch.inference_mode():  # weights made as the loader makes them: inference tensors
        net = frozen(make())
        fast_network(net)  # in place: channels-last, convolutions prepacked
    assert any(isinstance(m, PrepackedConv2d) for m in net.modules())
    assert all(p.is_inference() for p in net.parameters())
    plain = compiled.plain_copy(net)
    assert not any(isinstance(m, PrepackedConv2d) for m in plain.modules())
    assert not any(p.is_inference() or p.requires_grad for p in plain.parameters())
    x, t, c = inputs()
    with torch.inference_mode():
        torch.testing.assert_close(plain(x, t, c), net(x, t, c), rtol=0, atol=0)
