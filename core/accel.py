"""The GPU fast path of a sampling run: channels-last convolutions and a captured CUDA graph.

A sampling run calls the denoising network dozens of times with the same shapes (x [B, C, h, w],
t [B], context [B, L, D]). At small batches on a fast GPU, launching its few hundred kernels one
by one from Python costs more than the kernels themselves; a CUDA graph records them once and
replays them with one launch (torch.cuda.CUDAGraph). The graph reads fixed input buffers and
writes a fixed output buffer, so each call copies its inputs in and the output out: the numbers
are those of the eager network.

Capture applies on CUDA, without autograd, after WARMUP eager calls of the same shapes (cuDNN and
cuBLAS pick their kernels and allocate workspaces then, outside the graph). Anywhere else, for a
third set of shapes, or after a failed capture (an op that syncs with the host), the network runs
eagerly: the fast path is never a requirement.
"""
import warnings

import torch

WARMUP = 2  # eager calls of one shape before its capture; they return real results
MAX_GRAPHS = 2  # shapes captured per run (a sampler uses one; more means the shapes keep changing)


def channels_last(module):
    """Store the module's 4-D weights in channels-last (NHWC) layout, in place, for cuDNN's NHWC
    convolution kernels; returns the module. The values and every output are unchanged."""
    return module.to(memory_format=torch.channels_last)


class CapturedNetwork:
    """network(x, t, context), replayed from a CUDA graph per input shape where it can be."""

    def __init__(self, network):
        self.network = network
        self.calls = {}  # shape key -> eager calls so far
        self.graphs = {}  # shape key -> (graph, static inputs, static output)
        self.broken = False  # a capture failed: eager from then on

    def __call__(self, x, t, context):
        if self.broken or not self._eligible(x):
            return self.network(x, t, context)
        key = tuple((tuple(a.shape), a.dtype) for a in (x, t, context))
        if key in self.graphs:
            return self._replay(key, (x, t, context))
        seen = self.calls[key] = self.calls.get(key, 0) + 1
        if seen <= WARMUP or len(self.graphs) >= MAX_GRAPHS:
            return self._side_stream(x, t, context)
        try:
            self.graphs[key] = self._capture(x, t, context)
        except RuntimeError as error:  # e.g. "operation not permitted when stream is capturing"
            self.broken = True
            warnings.warn(f"CUDA graph capture failed, sampling eagerly: {error}")
            return self.network(x, t, context)
        return self._replay(key, (x, t, context))

    def _eligible(self, x):
        return x.device.type == "cuda" and not torch.is_grad_enabled()

    def _side_stream(self, *inputs):
        """An eager call on a side stream, as torch asks of the calls before a capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self.network(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, x, t, context):
        static = tuple(a.clone() for a in (x, t, context))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.network(*static)
        return graph, static, out

    def _replay(self, key, inputs):
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return out.clone()


def fast_network(network):
    """The network as a sampling run should call it: on CUDA in channels-last layout and replayed
    from captured graphs; elsewhere the network itself."""
    param = next(network.parameters())
    if param.device.type != "cuda":
        return network
    return CapturedNetwork(channels_last(network))
