"""The denoiser compiled ahead of time for this CPU and kept on disk (torch's AOTInductor; issue #30).

Eager PyTorch runs the built-in UNet's ~600 small operators one at a time, so at its sizes half of a
sampling step is spent between and around the convolutions. torch.export traces the network at one
input shape; AOTInductor turns that graph into C++ (norms, activations and additions fused into loops,
the weights of the convolutions and linear layers frozen and prepacked for oneDNN), compiles it with the
system's C++ compiler into a shared library that holds the weights: the "package" below. bench/RESULTS.md
has the measured gain (1.7x per sampling step of the built-in model in fp32, 2x in bf16) and the
outputs' distance to eager (within 1e-5 in fp32).

A package is built once per network weights, input shapes, dtype, torch version, CPU and pack source
(35-47 s for the built-in model on two cores) under cache_dir(); later runs, in any process,
load it in tens of milliseconds (through torch's C++ runner, without importing the compiler). A package
does not check the shapes it is given, so it is only ever called with the exact shapes it was built for;
other shapes get (or build) their own.
Where no package can be built (no C++ compiler, an operator export cannot trace, too little free memory),
the network runs eagerly and the reason is said once per network: compiling is never a requirement.
"""
import hashlib
import json
import logging
import os
import platform
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

# What a build may hold besides the eager network, measured for the built-in UNet (25 MB of weights): the
# compiler's own memory (300 MB in this process, 600 MB for g++), and copies of the weights (the export
# copy, the frozen constants, their prepacked form, the library's data), counted four times over.
BUILD_MEMORY = 2**30
BUILD_WEIGHT_COPIES = 4
PACK_SOURCE = Path(__file__).resolve().parent  # the network's code: a package is stale when it changes
_PACKAGES = weakref.WeakKeyDictionary()  # network -> CompiledNetwork (its packages live as long as it does)


def cache_dir():
    """Where packages are kept: $XDG_CACHE_HOME/ldm-nodes/compiled, by default ~/.cache/ldm-nodes/compiled."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ldm-nodes" / "compiled"


def compiled_network(network, state, note=None):
    """A callable network(x, t, context) that runs `network`'s package for each input shape, built on first
    use, and the network itself where no package can be had. note(text) hears of a build before it
    starts (it takes about a minute) and of a failure. One CompiledNetwork per network and weights `state`
    (where its weights live and how often they changed: accel.weight_state of each)."""
    cache = _PACKAGES.get(network)
    if cache is None or cache.state != state:  # new weights (moved, cast or changed): new packages
        cache = _PACKAGES[network] = CompiledNetwork(network, state)
    return lambda x, t, context: cache(x, t, context, note)


class CompiledNetwork:
    """The packages of one network, one per input shapes, loaded once per process."""

    def __init__(self, network, state):
        self._network = weakref.ref(network)
        self.state = state
        self.weights = weights_digest(network)
        self.runners = {}  # input signature -> loaded package
        self.failure = None  # why no package could be built: eager from then on

    def __call__(self, x, t, context, note):
        eager = self._network()
        if self.failure is not None or x.device.type != "cpu":
            return eager(x, t, context)
        signature = tuple((tuple(a.shape), str(a.dtype)) for a in (x, t, context))
        runner = self.runners.get(signature)
        if runner is None:
            try:
                runner = self.runners[signature] = self._load(x, t, context, note)
            except Exception as error:  # noqa: BLE001 - any failure to build means: run eagerly, and say why
                first_line = (str(error).strip().splitlines() or [""])[0]
                self.failure = f"{error.__class__.__name__}: {first_line[:300]}"
                message = f"could not compile the denoiser for this CPU, sampling eagerly ({self.failure})"
                warnings.warn(message)
                if note is not None:
                    note(message)
                return eager(x, t, context)
        return runner(x, t, context)

    def _load(self, x, t, context, note):
        network = self._network()  # alive: its caller holds it
        path = cache_dir() / f"{package_key(network, self.weights, (x, t, context))}.so"
        if not path.exists():
            check_build_memory(network)
            if note is not None:
                note(f"compiling the denoiser for this CPU at {list(x.shape)} (under a minute for a small "
                     "model, once: kept in " + str(cache_dir()) + ")")
            build_package(network, (x, t, context), path)
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        return lambda *inputs: runner.run(list(inputs))[0]


def build_package(network, inputs, path):
    """Export `network` at the shapes of `inputs`, compile it with AOTInductor (weights frozen, prepacked and
    built into the library) and write the library to `path` whole (built in a temporary folder beside it,
    then renamed: two processes building the same package cannot leave half of one, and the compiler's
    sources and objects go with the folder)."""
    import torch._inductor  # the compiler: imported only to build

    path.parent.mkdir(parents=True, exist_ok=True)
    plain = plain_copy(network)
    with torch.inference_mode(False), torch.no_grad(), tempfile.TemporaryDirectory(dir=path.parent) as work:
        program = torch.export.export(plain, tuple(inputs))
        library = os.path.join(work, path.name)  # the compiler writes its sources and objects beside it
        torch._inductor.aot_compile(program.module(), tuple(inputs), options={
            "freezing": True, "aot_inductor.package_constants_in_so": True, "aot_inductor.output_path": library})
        os.replace(library, path)
    logging.getLogger(__name__).info("compiled %s into %s", type(network).__name__, path)


def check_build_memory(network):
    """MemoryError, before anything is built, when the free memory is known to be short of what a build may
    take (BUILD_MEMORY + BUILD_WEIGHT_COPIES x the weights): the run then samples eagerly, saying why."""
    from .memory import available_memory

    weights = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    needed = BUILD_MEMORY + BUILD_WEIGHT_COPIES * weights
    available, source = available_memory("cpu")
    if available is not None and available < needed:
        raise MemoryError(f"compiling needs about {needed / 2**30:.1f} GB and {source} is "
                          f"{available / 2**30:.1f} GB")


def plain_copy(network):
    """The network rebuilt from its config with copies of its weights: ordinary modules (the eager network's
    prepacked convolutions hold oneDNN tensors export cannot trace) and ordinary tensors (inference tensors
    cannot be exported). The copies keep the weights' dtype and memory layout."""
    with torch.device("meta"):
        plain = type(network)(network.config)
    with torch.inference_mode(False), torch.no_grad():
        state = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    plain.load_state_dict(state, assign=True)
    return plain.requires_grad_(False).eval()


def weights_digest(network):
    """A digest of the network's weights (names, shapes, dtypes and bytes): a package holds the weights it
    was built with, so other weights need another package."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.inference_mode():
        for name, tensor in network.state_dict().items():
            digest.update(f"{name} {list(tensor.shape)} {tensor.dtype};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def package_key(network, weights, inputs):
    """The package's file name: a digest of all it depends on (the network's class, config and weights, the
    input shapes and dtypes, torch's version, this CPU and the pack's source)."""
    what = {
        "network": type(network).__name__,
        "config": repr(getattr(network, "config", None)),
        "weights": weights,
        "inputs": [(list(a.shape), str(a.dtype)) for a in inputs],
        "torch": torch.__version__,
        "cpu": cpu_identity(),
        "source": source_digest(),
    }
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=16).hexdigest()


def cpu_identity():
    """The CPU's model and instruction flags: the package is compiled for this CPU's instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return [line for line in lines if line.split(":")[0].strip() in wanted][:2]


def source_digest():
    """A digest of the pack's core/*.py: the network's code (a package of an older version is stale)."""
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(PACK_SOURCE.glob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()
