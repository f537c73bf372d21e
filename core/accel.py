"""The GPU fast path of a sampling run: a captured CUDA graph per step shape, and the sampler's state in fp32.

A sampling run calls the denoising network dozens of times with the same shapes (x [B, C, h, w],
t [B], context [B, L, D]). At small batches on a fast GPU, launching its few hundred kernels one
by one from Python costs more than the kernels themselves; a CUDA graph records them once and
replays them with one launch (torch.cuda.CUDAGraph). The graph reads fixed input buffers and
writes a fixed output buffer, so each call copies its inputs in and the output out: the numbers
are those of the eager network.

The sampler's state x stays in fp32 whatever the weights' dtype (as ComfyUI and k-diffusion do):
only the network's input is cast to the weights' dtype, and its prediction comes back in fp32, so
the updates, the guidance mix and x0 are computed in fp32. In bf16 the spacing of representable
values near |x| = 15 is 0.0625, too coarse for a state updated 30 times.

Capture applies on CUDA, under inference mode (as sampling runs), after WARMUP eager calls of the same shapes (cuDNN and
cuBLAS pick their kernels and allocate workspaces then, outside the graph). The graphs are kept per
network (keyed by the network object, and dropped when its weights move: their device, dtype or
data pointers change), so a second sampling run replays at once. Anywhere else, or after a failed
capture (an op that syncs with the host, or a warning about the graph or its capture, such as an
empty graph), the network runs eagerly: the fast path is never a requirement.
"""
import functools
import warnings
import weakref

import torch

WARMUP = 2  # eager calls of one shape before its capture; they return real results
MAX_GRAPHS = 2  # graphs kept per network; a new shape beyond them replaces the least recently used
# NHWC weights on CUDA. Off until measured: CUDA's GroupNorm makes its input NCHW-contiguous and returns
# NCHW, so with NHWC weights every norm/conv pair transposes twice (issue #20). bench/gpu_check.py times both.
CHANNELS_LAST = False

_CAPTURED = weakref.WeakKeyDictionary()  # network -> its CapturedNetwork (the graphs die with the network)


def channels_last(module):
    """Store the module's 4-D weights in channels-last (NHWC) layout, in place, for cuDNN's NHWC
    convolution kernels; returns the module. The values and every output are unchanged."""
    return module.to(memory_format=torch.channels_last)


def cpu_layout(module):
    """The module in the layout the CPU runs fastest: channels-last, whose convolutions oneDNN runs without
    reordering each input and output (bench/RESULTS.md: 1.1x on the built-in UNet's step, up to 1.3x on
    the pixel model's nll batches, outputs within 1e-5 of NCHW), and, for frozen weights, their 3x3
    convolutions prepacked (prepack_convolutions). Modules off the CPU are unchanged."""
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    if not on_cpu:
        return module
    # the converted weights are of the kind the old ones were: weights made under inference mode could not
    # be used outside it, and inference-mode weights cannot be converted outside it
    with torch.inference_mode(any(p.is_inference() for p in module.parameters())):
        channels_last(module)
        prepack_convolutions(module)
    return module


class PrepackedConv2d(torch.nn.Conv2d):
    """nn.Conv2d whose weight oneDNN has reordered once into its own blocked layout, so a call skips the
    reorder a plain weight costs each time (bench/RESULTS.md). The same oneDNN kernel: the same outputs.
    Whenever the packed copy may not be the weight (the weight moved, was cast or changed in place since
    packing: its memory or version differ; an input off the CPU or of another dtype) it runs nn.Conv2d's
    own forward."""

    def forward(self, x):
        packed, source = self.prepacked
        if x.device.type != "cpu" or x.dtype != packed.dtype or weight_state(self.weight) != source:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, self.padding, self.stride, self.dilation,
                                                       self.groups, "none", [], "")


def weight_state(weight):
    """Where a weight lives and how often it was changed in place (inference tensors cannot be changed)."""
    return weight.data_ptr(), None if weight.is_inference() else weight._version


def prepack_convolutions(module):
    """Prepack, in place, the convolutions of `module` that gain from it: kernels wider than 1x1 (at 1x1 the
    plain path is as fast) with frozen CPU weights (no gradient: a loaded model, not one being trained) in
    fp32 or bf16. Already packed ones whose weight has since moved or changed are packed again. Returns the
    module."""
    if not torch.backends.mkldnn.is_available():
        return module
    for conv in module.modules():
        if (type(conv) not in (torch.nn.Conv2d, PrepackedConv2d) or conv.kernel_size == (1, 1)
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or conv.weight.device.type != "cpu" or conv.weight.dtype not in (torch.float32, torch.bfloat16)
                or conv.weight.requires_grad):
            continue
        if type(conv) is PrepackedConv2d and conv.prepacked[1] == weight_state(conv.weight):
            continue
        packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, list(conv.padding), list(conv.stride),
                                                                list(conv.dilation), conv.groups)
        conv.__class__ = PrepackedConv2d
        conv.prepacked = (packed, weight_state(conv.weight))
    return module


def gpu_layout(module):
    """The module in the layout the fast path uses on its device: channels-last on CUDA when
    CHANNELS_LAST, otherwise unchanged. Returns the module."""
    on_cuda = any(p.device.type == "cuda" for p in module.parameters())
    return channels_last(module) if CHANNELS_LAST and on_cuda else module


@functools.cache
def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU computes bf16 dot products natively (the avx512_bf16 or amx_bf16 flag, as Linux
    reports them): there oneDNN runs bf16 convolutions and matmuls about twice as fast as fp32
    (bench/RESULTS.md). False where the flags cannot be read."""
    try:
        with open(cpuinfo) as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def run_fp32(network, x, t, context):
    """network(x, t, context) for a state x in fp32: x is cast to the weights' dtype on the way in and
    the prediction back to fp32 on the way out (context is expected in the weights' dtype already)."""
    dtype = next(network.parameters()).dtype
    return network(x.to(dtype), t, context).float()


def weights_key(network):
    """What a captured graph depends on besides its inputs: where the weights live, in memory."""
    param = next(network.parameters())
    return param.device, param.dtype, tuple(p.data_ptr() for p in network.parameters())


class CapturedNetwork:
    """run_fp32(network, x, t, context), replayed from a CUDA graph per input shape where it can be.

    Holds the network weakly: the cache lives beside the network, never keeps it alive."""

    def __init__(self, network):
        self._network = weakref.ref(network)
        self.weights = weights_key(network)
        self.calls = {}  # input key -> eager calls so far
        self.graphs = {}  # input key -> (graph, static inputs, static output), least recently used first
        self.broken = False  # a capture failed: eager from then on

    @property
    def network(self):
        return self._network()

    def __call__(self, x, t, context):
        if self.broken or not self._eligible(x):
            return run_fp32(self.network, x, t, context)
        key = (x.device,) + tuple((tuple(a.shape), a.dtype) for a in (x, t, context))
        with self._device(x):  # warm-up, capture and replay on x's device, even when it is not the current one
            if key in self.graphs:
                self.graphs[key] = self.graphs.pop(key)  # most recently used last
                return self._replay(key, (x, t, context))
            seen = self.calls[key] = self.calls.get(key, 0) + 1
            if seen <= WARMUP:
                return self._side_stream(x, t, context)
            try:
                graph = self._capture(x, t, context)
            except (RuntimeError, Warning) as error:  # e.g. "operation not permitted when stream is capturing"
                self.broken = True
                warnings.warn(f"CUDA graph capture failed, sampling eagerly: {error}")
                return run_fp32(self.network, x, t, context)
            if len(self.graphs) >= MAX_GRAPHS:
                del self.graphs[next(iter(self.graphs))]
            self.graphs[key] = graph
            return self._replay(key, (x, t, context))

    def _eligible(self, x):
        return x.device.type == "cuda" and torch.is_inference_mode_enabled()

    def _device(self, x):
        return torch.cuda.device(x.device)

    def _side_stream(self, *inputs):
        """An eager call on a side stream, as torch asks of the calls before a capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = run_fp32(self.network, *inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, x, t, context):
        """(graph, static inputs, static output). A warning about the graph or its capture (an empty
        graph: captured on the wrong device or stream) raises. After a failure the caller's stream is
        current again (our own stream context restores it even when torch's does not get to) and
        the device is synchronized before eager calls go on."""
        static = tuple(a.clone() for a in (x, t, context))
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*(graph|captur)")  # matched ignoring case
                with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                    out = run_fp32(self.network, *static)
        except BaseException:
            torch.cuda.synchronize()
            raise
        torch.cuda.current_stream().wait_stream(stream)
        return graph, static, out

    def _replay(self, key, inputs):
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return out.clone()


def fast_network(network, compiled=False, note=None):
    """The network as a sampling run should call it, with its state x in fp32 (run_fp32): on CUDA in
    gpu_layout and replayed from the network's captured graphs; elsewhere on the CPU in cpu_layout, run
    eagerly or, when `compiled`, from its ahead-of-time compiled packages (core/compiled.py; note(text)
    hears of a build, which takes about a minute, and of a failure to build)."""
    param = next(network.parameters())
    if param.device.type == "cuda":
        return captured(gpu_layout(network))
    cpu_layout(network)
    if not compiled:
        return lambda x, t, context: run_fp32(network, x, t, context)
    from .compiled import compiled_network  # only when asked: it is not needed to start
    state = tuple(weight_state(tensor) for tensor in network.state_dict().values())
    call = compiled_network(network, state, note)
    return lambda x, t, context: call(x.to(param.dtype), t, context).float()


def captured(network, kind=CapturedNetwork):
    """The network's CapturedNetwork, kept between runs; a new one when its weights have moved."""
    cache = _CAPTURED.get(network)
    if cache is None or cache.weights != weights_key(network):
        cache = _CAPTURED[network] = kind(network)
    return cache
