"""The fast path (core/accel.py) and reduced precision on the CPU: the numbers do not change.

Off CUDA the fast path is the network with its input cast to the weights' dtype and its prediction
back to fp32; the graph bookkeeping (warm-up, one graph per shape, least recently used out, the cache
kept per network until its weights move, eager after a failed capture) runs here with a stand-in for
the CUDA graph. Channels-last weights give the same outputs; fp16 / bf16 drift from a float64
reference stays within their rounding, for one network call and for a whole sampling run with the
state in fp32. The CUDA side is tests/test_gpu_cuda.py.
"""
import copy
import gc
from contextlib import nullcontext

import pytest
import torch

from ldm_nodes.core import accel, samplers
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, sample
from ldm_nodes.core.randomise import randomise
from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule
from ldm_nodes.core.transformer import TransformerConfig, TransformerModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), transformer_depth=1, context_dim=64, num_head_channels=16)
TRANSFORMER = TransformerConfig(in_channels=4, out_channels=4, width=64, depth=2, heads=4, context_dim=64,
                                base_size=8)
AUTOENCODER = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def inputs(batch=2, size=16, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.linspace(10.3, 937.7, batch),
            torch.randn(batch, tokens, 64, generator=g))


def networks():
    return [randomise(UNetModel(UNET)), randomise(TransformerModel(TRANSFORMER))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_network_off_cuda_casts_the_input_and_returns_fp32(dtype):
    net = networks()[0].to(dtype)
    fast = accel.fast_network(net)
    x, t, c = inputs()
    with torch.inference_mode():
        out = fast(x, t, c.to(dtype))
        torch.testing.assert_close(out, net(x.to(dtype), t, c.to(dtype)).float(), rtol=0, atol=0)
    assert out.dtype == torch.float32 and net not in accel._CAPTURED


def test_captured_network_runs_eagerly_on_cpu():
    net = networks()[0]
    captured = accel.CapturedNetwork(net)
    with torch.inference_mode():
        for seed in range(accel.WARMUP + 2):  # past the calls after which CUDA would capture
            x, t, c = inputs(seed=seed)
            torch.testing.assert_close(captured(x, t, c), net(x, t, c), rtol=0, atol=0)
    assert not captured.graphs


class GraphOnCPU(accel.CapturedNetwork):
    """The bookkeeping of CapturedNetwork with a stand-in for the CUDA graph: "replay" reruns the
    network on the static buffers and writes into the static output, as a graph would. A batch of 3
    fails to capture with an error, a batch of 5 with a warning turned error (an empty graph)."""

    def __init__(self, network):
        super().__init__(network)
        self.captures = 0

    def _eligible(self, x):
        return not torch.is_grad_enabled()

    def _device(self, x):
        return nullcontext()

    def _side_stream(self, *inputs):
        return accel.run_fp32(self.network, *inputs)

    def _capture(self, x, t, context):
        self.captures += 1
        if x.shape[0] == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        if x.shape[0] == 5:
            raise UserWarning("The CUDA Graph is empty. This usually means that the graph was attempted "
                              "to be captured on wrong device or stream.")
        static = tuple(a.clone() for a in (x, t, context))
        out = accel.run_fp32(self.network, *static)
        graph = type("Graph", (), {"replay": lambda _: out.copy_(accel.run_fp32(self.network, *static))})()
        return graph, static, out


def test_capture_bookkeeping_warmup_replay_and_least_recently_used():
    net = networks()[0]
    captured = GraphOnCPU(net)
    with torch.inference_mode():
        outputs = []
        for seed in range(accel.WARMUP + 3):  # a new t and x every call: replay must not freeze either
            x, t, c = inputs(seed=seed)
            t = t + seed
            outputs.append(captured(x, t, c))
            torch.testing.assert_close(outputs[-1], net(x, t, c), rtol=0, atol=0)  # new inputs copied in
            assert len(captured.graphs) == (seed >= accel.WARMUP) and captured.captures == len(captured.graphs)
        assert not torch.equal(outputs[-1], outputs[-2])  # each call returned its own tensor, not the buffer
        batches = [1, 4, 6][:accel.MAX_GRAPHS + 1]  # one more shape than the graphs kept
        for batch in batches:
            for _ in range(accel.WARMUP + 1):
                x, t, c = inputs(batch=batch)
                torch.testing.assert_close(captured(x, t, c), net(x, t, c), rtol=0, atol=0)
        assert len(captured.graphs) == accel.MAX_GRAPHS
        assert [key[1][0][0] for key in captured.graphs] == batches[-accel.MAX_GRAPHS:]  # the oldest went
        assert captured.captures == 1 + len(batches)


@pytest.mark.parametrize("batch", [3, 5], ids=["error", "warning"])
def test_failed_capture_runs_eagerly_from_then_on(batch):
    net = networks()[0]
    with torch.inference_mode(), pytest.warns(UserWarning, match="capture failed"):
        broken = GraphOnCPU(net)
        for _ in range(accel.WARMUP + 2):
            x, t, c = inputs(batch=batch)
            torch.testing.assert_close(broken(x, t, c), net(x, t, c), rtol=0, atol=0)
    assert broken.broken and broken.captures == 1 and not broken.graphs


def test_graphs_are_kept_per_network_until_its_weights_move():
    net = networks()[0]
    with torch.inference_mode():
        first = accel.captured(net, GraphOnCPU)
        for _ in range(accel.WARMUP + 1):
            first(*inputs())
        again = accel.captured(net, GraphOnCPU)
        assert again is first  # a second run replays at once: no new warm-up, no new capture
        again(*inputs(seed=1))
        assert again.captures == 1 and len(again.graphs) == 1
        assert accel.captured(networks()[0], GraphOnCPU) is not first  # another network, its own graphs
        net.to(torch.bfloat16)  # new weight tensors: a graph would read freed memory
        moved = accel.captured(net, GraphOnCPU)
        assert moved is not first and not moved.graphs
    del net, first, again, moved
    gc.collect()
    assert not any(isinstance(cache, GraphOnCPU) for cache in accel._CAPTURED.values())  # held weakly


def test_gpu_layout_is_off_the_cpu_whatever_the_setting(monkeypatch):
    monkeypatch.setattr(accel, "CHANNELS_LAST", True)
    net = accel.gpu_layout(networks()[0])
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous()


@pytest.mark.parametrize("make", [lambda: randomise(UNetModel(UNET)), lambda: randomise(AutoencoderKL(AUTOENCODER))],
                         ids=["unet", "autoencoder"])
def test_channels_last_changes_layout_not_outputs(make):
    module = make()
    x, t, c = inputs()
    with torch.inference_mode():
        run = (lambda m: m(x, t, c)) if isinstance(module, UNetModel) else (lambda m: m.decode(x))
        before = run(module)
        accel.channels_last(module)
        conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        torch.testing.assert_close(run(module), before, rtol=1e-5, atol=1e-5)


def test_decode_tiled_blend_weights_follow_the_latent_device_and_dtype():
    """The blend weights are made on the CPU in float64: they must move to the latent's device (CUDA in
    use; the meta device here, where a CPU tensor times a meta tensor raises as it would on CUDA)."""
    vae = AutoencoderKL(AUTOENCODER).to("meta", torch.bfloat16)
    z = torch.zeros(1, AUTOENCODER.embed_dim, 40, 24, device="meta", dtype=torch.bfloat16)
    out = vae.decode_tiled(z, tile=16, overlap=4)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == (1, 3, 80, 48)


def test_step_noise_is_the_cpu_generator_draw():
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    noise = samplers._noise(x, torch.Generator().manual_seed(3))
    assert noise.dtype == torch.float64
    torch.testing.assert_close(noise, torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).double(),
                               rtol=0, atol=0)


# Relative to the largest output, against a float64 run of the same weights. fp16 keeps 11 bits, bf16 8.
# Measured when written: fp16 1.3e-3 (UNet) and 1.1e-3 (transformer), bf16 1.1e-2 and 8.4e-3; the bounds
# leave about twice that.
DRIFT = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.mark.parametrize("dtype", DRIFT, ids=["fp16", "bf16"])
@pytest.mark.parametrize("index", [0, 1], ids=["unet", "transformer"])
def test_reduced_precision_drift_is_bounded(index, dtype):
    net = networks()[index]
    x, t, c = inputs()
    with torch.inference_mode():
        reference = net.double()(x.double(), t, c.double())
        out = net.to(dtype)(x.to(dtype), t, c.to(dtype)).double()
    drift = ((out - reference).abs().max() / reference.abs().max()).item()
    assert drift <= DRIFT[dtype], f"{dtype} drift {drift:.2e} > {DRIFT[dtype]:.0e}"


# A whole 10-step CFG run (cfg 5) with the state in fp32, against the float64 network, relative to the
# largest latent value. Measured when written (dpmpp_2m, euler_ancestral): fp16 1.4e-3 and 2.1e-3, bf16
# 1.4e-2 and 1.8e-2; with the state in the weights' dtype, as before issue #20: fp16 2.4e-3 and 2.6e-3,
# bf16 1.7e-2 and 2.7e-2. The bounds leave about twice the fp32-state figures.
RUN_DRIFT = {torch.float16: 4e-3, torch.bfloat16: 3.5e-2}


def sampling_run(network, sampler, callback=None):
    schedule = TrainingSchedule("scaled_linear", 1000)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (Conditioning(torch.randn(1, 7, 64, generator=g), "") for _ in range(2))
    return sample(DiffusionModel(network, schedule, "eps", 1.0, 4), torch.zeros(1, 4, 16, 16), cond, uncond, 7,
                  sampler, 5.0, sampling_schedule(schedule, 10, "karras").sigmas, callback=callback)


@pytest.mark.parametrize("dtype", RUN_DRIFT, ids=["fp16", "bf16"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_sampling_state_stays_fp32_with_reduced_precision_weights(sampler, dtype):
    net = networks()[0]
    reference = sampling_run(copy.deepcopy(net).double(), sampler)
    states = []
    out = sampling_run(net.to(dtype), sampler, lambda step: states.append((step["x"].dtype, step["denoised"].dtype)))
    assert set(states) == {(torch.float32, torch.float32)}  # the updates, the CFG mix and x0 in fp32
    drift = ((out - reference).abs().max() / reference.abs().max()).item()
    assert drift <= RUN_DRIFT[dtype], f"{dtype} run drift {drift:.2e} > {RUN_DRIFT[dtype]:.0e}"
