"""The fast path (core/accel.py) and reduced precision on the CPU: the numbers do not change.

Off CUDA the fast path is the network with its input cast to the weights' dtype and its prediction
back to fp32; the graph bookkeeping (warm-up, one graph per shape, least recently used out, the cache
kept per network until its weights move, eager after a failed capture) runs here with stand-ins for
the few torch.cuda calls it makes (FakeCUDA), so accel's own warm-up, capture, warning filter and replay
lines run; only the "is x on CUDA" check is overridden. Channels-last weights give the same outputs; fp16 / bf16 drift from a float64
reference stays within their rounding, for one network call and for a whole sampling run with the
state in fp32. The tests named test_cuda_* need CUDA (skipped without it; bench/gpu_check.py runs them).
"""
import copy
import gc
import warnings
import weakref
from contextlib import nullcontext

import pytest
import torch

from ldm_nodes.core import accel, samplers
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, decode_latent, sample
from ldm_nodes.tools.randomise import randomise
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
    """Against the float64 network (not run_fp32's own expression): within the dtype's rounding."""
    net = networks()[0]
    x, t, c = inputs()
    with torch.inference_mode():
        reference = copy.deepcopy(net).double()(x.double(), t, c.double())
        seen = []
        net.to(dtype).register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        out = accel.fast_network(net)(x, t, c.to(dtype))
    drift = ((out.double() - reference).abs().max() / reference.abs().max()).item()
    assert out.dtype == torch.float32 and seen == [dtype] and net not in accel._CAPTURED
    assert drift <= {torch.float32: 1e-5, torch.bfloat16: DRIFT[torch.bfloat16]}[dtype], drift


def test_fast_network_on_the_cpu_runs_channels_last_with_nchw_outputs():
    for net in networks():
        reference = copy.deepcopy(net)
        fast = accel.fast_network(net)
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        x, t, c = inputs()
        with torch.inference_mode():
            torch.testing.assert_close(fast(x, t, c), reference(x, t, c), rtol=1e-5, atol=1e-5)


def test_captured_network_runs_eagerly_on_cpu(monkeypatch):
    """Off CUDA no warm-up, capture or replay is reached, whatever the number of calls."""
    net = networks()[0]
    captured = accel.CapturedNetwork(net)
    for name in ("_side_stream", "_capture", "_replay"):
        monkeypatch.setattr(accel.CapturedNetwork, name, lambda *a, name=name: pytest.fail(f"{name} called on the CPU"))
    with torch.inference_mode():
        for seed in range(accel.WARMUP + 2):  # past the calls after which CUDA would capture
            x, t, c = inputs(seed=seed)
            reference = copy.deepcopy(net).double()(x.double(), t, c.double())
            torch.testing.assert_close(captured(x, t, c).double(), reference, rtol=1e-5, atol=1e-5)
    assert not captured.graphs and not captured.calls


class FakeCUDA:
    """A stand-in for the few torch.cuda calls CapturedNetwork makes, so that its own lines run on the
    CPU: the warm-up on a side stream, the capture with its warning filter and its clean-up on failure,
    the replay. Only `_eligible` (is x on CUDA?) is overridden, in GraphOnCPU. The graph records the
    network call made inside `torch.cuda.graph(...)` (a forward hook) and a replay reruns it on the
    same input tensors, writing into the same output tensor, as a CUDA graph does. A batch of 3 fails
    inside the capture with an error; a batch of 5 ends it with torch's warning about an empty graph
    (CapturedNetwork's own filter must turn it into a failure)."""

    def __init__(self, monkeypatch):
        self.graphs, self.syncs = 0, 0
        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        fake = self

        class Graph:
            def __init__(self):
                fake.graphs += 1
                self.call = None

            def replay(self):
                module, args, out = self.call
                out.copy_(module()(*args))

        class Capturing:
            def __init__(self, graph, stream=None):
                self.graph = graph

            def __enter__(self):
                def record(module, args, out):
                    if args[0].shape[0] == 3:
                        raise RuntimeError("operation not permitted when stream is capturing")
                    self.graph.call = (weakref.ref(module), args, out)  # a graph holds no network
                self.hooks = [m.register_forward_hook(record) for m in fake.networks]

            def __exit__(self, *error):
                for hook in self.hooks:
                    hook.remove()
                if error[0] is None and self.graph.call[1][0].shape[0] == 5:
                    warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted "
                                  "to be captured on wrong device or stream.")

        self.networks = weakref.WeakSet()
        monkeypatch.setattr(torch.cuda, "Stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
        monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capturing)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: setattr(fake, "syncs", fake.syncs + 1))


class GraphOnCPU(accel.CapturedNetwork):
    """CapturedNetwork with CPU tensors taken as eligible; everything else is accel's own code."""

    def _eligible(self, x):
        return torch.is_inference_mode_enabled()


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCUDA(monkeypatch)


def graph_on_cpu(net, fake):
    fake.networks.add(net)
    return GraphOnCPU(net)


def test_capture_bookkeeping_warmup_replay_and_least_recently_used(fake_cuda):
    net = networks()[0]
    captured = graph_on_cpu(net, fake_cuda)
    with torch.inference_mode():
        outputs = []
        for seed in range(accel.WARMUP + 3):  # a new t and x every call: replay must not freeze either
            x, t, c = inputs(seed=seed)
            t = t + seed
            outputs.append(captured(x, t, c))
            torch.testing.assert_close(outputs[-1], net(x, t, c), rtol=0, atol=0)  # new inputs copied in
            assert len(captured.graphs) == (seed >= accel.WARMUP) and fake_cuda.graphs == len(captured.graphs)
        assert not torch.equal(outputs[-1], outputs[-2])  # each call returned its own tensor, not the buffer
        batches = [1, 4, 6][:accel.MAX_GRAPHS + 1]  # one more shape than the graphs kept
        for batch in batches:
            for _ in range(accel.WARMUP + 1):
                x, t, c = inputs(batch=batch)
                torch.testing.assert_close(captured(x, t, c), net(x, t, c), rtol=0, atol=0)
        assert len(captured.graphs) == accel.MAX_GRAPHS
        assert [key[1][0][0] for key in captured.graphs] == batches[-accel.MAX_GRAPHS:]  # the oldest went
        assert fake_cuda.graphs == 1 + len(batches) and fake_cuda.syncs == 0


@pytest.mark.parametrize("batch", [3, 5], ids=["error", "warning"])
def test_failed_capture_runs_eagerly_from_then_on(batch, fake_cuda):
    net = networks()[0]
    with torch.inference_mode(), pytest.warns(UserWarning, match="capture failed"):
        broken = graph_on_cpu(net, fake_cuda)
        for _ in range(accel.WARMUP + 2):
            x, t, c = inputs(batch=batch)
            torch.testing.assert_close(broken(x, t, c), net(x, t, c), rtol=0, atol=0)
    assert broken.broken and fake_cuda.graphs == 1 and not broken.graphs
    assert fake_cuda.syncs == 1  # the device synchronized before eager calls go on


def test_graphs_are_kept_per_network_until_its_weights_move(fake_cuda):
    net = networks()[0]
    fake_cuda.networks.add(net)
    with torch.inference_mode():
        first = accel.captured(net, GraphOnCPU)
        for _ in range(accel.WARMUP + 1):
            first(*inputs())
        again = accel.captured(net, GraphOnCPU)
        assert again is first  # a second run replays at once: no new warm-up, no new capture
        again(*inputs(seed=1))
        assert fake_cuda.graphs == 1 and len(again.graphs) == 1
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


def sampling_run(network, sampler, callback=None, cfg=5.0):
    schedule = TrainingSchedule("scaled_linear", 1000)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (Conditioning(torch.randn(1, 7, 64, generator=g), "") for _ in range(2))
    return sample(DiffusionModel(network, schedule, "eps", 1.0, 4), torch.zeros(1, 4, 16, 16), cond,
                  uncond if cfg != 1 else None, seed=7, sampler_name=sampler, cfg=cfg,
                  sigmas=sampling_schedule(schedule, 10, "karras").sigmas, callback=callback)


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


# --- CUDA (skipped without it; bench/gpu_check.py runs these on a lent device) ---------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SD15_UNET = UNetConfig(4, 4, 320, (1, 2, 4, 4), 2, (0, 1, 2), 1, 768, num_heads=8)


@pytest.fixture
def fp32_without_tf32(monkeypatch):
    """fp32 on CUDA as on the CPU: TF32 convolutions and matmuls off, so fp32 comparisons can be tight."""
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")


def eager_run(monkeypatch, network, sampler, cfg=5.0):
    """sampling_run without the fast path: the network called eagerly in its own layout."""
    with monkeypatch.context() as patch:
        patch.setattr("ldm_nodes.core.pipeline.fast_network",
                      lambda net: lambda x, t, c: accel.run_fp32(net, x, t, c))
        return sampling_run(network, sampler, cfg=cfg)


def count_replays(monkeypatch):
    replays = []
    replay = accel.CapturedNetwork._replay
    monkeypatch.setattr(accel.CapturedNetwork, "_replay",
                        lambda self, key, inputs: replays.append(key) or replay(self, key, inputs))
    return replays


@cuda
@pytest.mark.filterwarnings("error")  # a capture warning (an empty graph) fails the test, not only the graph
def test_cuda_sample_captures_once_and_replays_every_later_step(monkeypatch, fp32_without_tf32):
    net = networks()[0].cuda()
    replays = count_replays(monkeypatch)
    fast = sampling_run(net, "dpmpp_2m")  # 10 steps, 10 network calls
    cache = accel._CAPTURED[net]
    assert len(cache.graphs) == 1 and not cache.broken
    assert len(replays) == 10 - accel.WARMUP
    again = sampling_run(net, "dpmpp_2m")  # the graph is kept: every call of a second run replays
    assert accel._CAPTURED[net] is cache and len(replays) == 20 - accel.WARMUP
    torch.testing.assert_close(again, fast, rtol=1e-4, atol=1e-4)
    eager = eager_run(monkeypatch, copy.deepcopy(net), "dpmpp_2m")
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("index", [0, 1], ids=["unet", "transformer"])
def test_cuda_replay_follows_every_input_and_keeps_returned_outputs(index):
    net = networks()[index].cuda().half()
    captured = accel.CapturedNetwork(net)
    with torch.inference_mode():
        for seed in range(accel.WARMUP + 4):  # a different x, t and context every call
            x, t, c = (a.cuda() for a in inputs(seed=seed))
            out = captured(x, t + 37 * seed, c.half())
            torch.testing.assert_close(out, accel.run_fp32(net, x, t + 37 * seed, c.half()), rtol=1e-3, atol=1e-3)
        assert len(captured.graphs) == 1 and not captured.broken
        kept = out.clone()
        x, t, c = (a.cuda() for a in inputs(seed=99))
        captured(x, t, c.half())  # a later replay must not overwrite an output already returned
        torch.testing.assert_close(out, kept, rtol=0, atol=0)


@cuda
@pytest.mark.filterwarnings("error")
def test_cuda_cfg_on_and_off_in_one_process(monkeypatch, fp32_without_tf32):
    net = networks()[0].cuda()
    for cfg in (5.0, 1.0, 5.0):  # batch 2, then 1, then 2 again: two graphs, both kept
        fast = sampling_run(net, "euler", cfg=cfg)
        torch.testing.assert_close(fast, eager_run(monkeypatch, copy.deepcopy(net), "euler", cfg), rtol=1e-4, atol=1e-4)
    assert sorted(key[1][0][0] for key in accel._CAPTURED[net].graphs) == [1, 2]


@cuda
@pytest.mark.parametrize("dtype", RUN_DRIFT, ids=["fp16", "bf16"])
def test_cuda_reduced_precision_sampling_drift_is_bounded(dtype):
    net = networks()[0]
    reference = sampling_run(copy.deepcopy(net).cuda().double(), "dpmpp_2m")
    out = sampling_run(net.cuda().to(dtype), "dpmpp_2m")
    assert not accel._CAPTURED[net].broken
    drift = ((out - reference).abs().max() / reference.abs().max()).item()
    assert drift <= RUN_DRIFT[dtype], f"{dtype} run drift {drift:.2e} > {RUN_DRIFT[dtype]:.0e}"


@cuda
def test_cuda_stochastic_sampler_noise_matches_the_cpu(fp32_without_tf32):
    """The pinned, non-blocking step noise is the CPU generator's draw; a whole ancestral run agrees."""
    x = torch.zeros(2, 4, 8, 8, device="cuda")
    noise = samplers._noise(x, torch.Generator().manual_seed(3))
    assert noise.device == x.device
    torch.testing.assert_close(noise.cpu(), torch.randn(x.shape, generator=torch.Generator().manual_seed(3)),
                               rtol=0, atol=0)
    net = networks()[0]
    on_cpu = sampling_run(copy.deepcopy(net), "euler_ancestral")
    torch.testing.assert_close(sampling_run(net.cuda(), "euler_ancestral"), on_cpu, rtol=1e-3, atol=1e-3)


@cuda
def test_cuda_tiled_decode_matches_the_cpu(fp32_without_tf32):
    vae = randomise(AutoencoderKL(AUTOENCODER))
    z = torch.randn(1, AUTOENCODER.embed_dim, 40, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        on_cpu = vae.decode_tiled(z, tile=16, overlap=4)
        on_cuda = vae.cuda().decode_tiled(z.cuda(), tile=16, overlap=4).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("make", [lambda: randomise(UNetModel(UNET)), lambda: randomise(AutoencoderKL(AUTOENCODER))],
                         ids=["unet", "autoencoder"])
def test_cuda_channels_last_matches_nchw(make, fp32_without_tf32):
    module = make().cuda()
    x, t, c = (a.cuda() for a in inputs())
    with torch.inference_mode():
        run = (lambda m: m(x, t, c)) if isinstance(module, UNetModel) else (lambda m: m.decode(x))
        nchw = run(module)
        nhwc = run(accel.channels_last(module))
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-4)


class HostSync(torch.nn.Module):
    """The network with a host sync (.item()) inside: legal eagerly, forbidden while capturing."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x, t, context):
        if x.abs().max().item() > 1e30:
            raise FloatingPointError("not reached")
        return self.network(x, t, context)


@cuda
def test_cuda_failed_capture_leaves_eager_results_and_the_default_stream():
    net = networks()[0].cuda()
    syncing = HostSync(net)
    captured = accel.CapturedNetwork(syncing)
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="capture failed"):
            for seed in range(accel.WARMUP + 2):
                x, t, c = (a.cuda() for a in inputs(seed=seed))
                torch.testing.assert_close(captured(x, t, c), net(x, t, c), rtol=1e-4, atol=1e-4)
        assert captured.broken and not captured.graphs
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        torch.cuda.synchronize()
        working = accel.CapturedNetwork(net)  # capture still works afterwards
        for seed in range(accel.WARMUP + 2):
            x, t, c = (a.cuda() for a in inputs(seed=seed))
            torch.testing.assert_close(working(x, t, c), net(x, t, c), rtol=1e-4, atol=1e-4)
        assert len(working.graphs) == 1 and not working.broken


@cuda
@pytest.mark.filterwarnings("error")
def test_cuda_two_sizes_in_one_process_and_more_than_max_graphs():
    net = networks()[0].cuda().half()
    captured = accel.CapturedNetwork(net)
    sizes = [16, 24, 32, 16][:accel.MAX_GRAPHS + 2]  # one size more than the graphs kept, then the first again
    with torch.inference_mode():
        for size in sizes:
            for seed in range(accel.WARMUP + 2):
                x, t, c = (a.cuda() for a in inputs(size=size, seed=seed))
                out = captured(x, t + seed, c.half())
                torch.testing.assert_close(out, accel.run_fp32(net, x, t + seed, c.half()), rtol=1e-3, atol=1e-3)
    assert len(captured.graphs) == accel.MAX_GRAPHS and not captured.broken


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.filterwarnings("error")
def test_cuda_second_device_captures_on_its_own_stream(monkeypatch, fp32_without_tf32):
    net = networks()[0].to("cuda:1")
    replays = count_replays(monkeypatch)
    with torch.cuda.device(0):
        fast = sampling_run(net, "dpmpp_2m")
    assert len(replays) == 10 - accel.WARMUP
    torch.testing.assert_close(fast, eager_run(monkeypatch, copy.deepcopy(net), "dpmpp_2m"), rtol=1e-4, atol=1e-4)


# Peak memory of an SD1.5-shaped run: fp16 UNet, fp32 autoencoder (LDMLoadModel's auto precision), 4 CFG
# steps at a 64x64 latent and the 512x512 decode. THE BOUNDS ARE ESTIMATES, NOT MEASUREMENTS (no CUDA device
# has run this yet): the decoder's 256-channel 512x512 fp32 activations (256 MiB each, a few alive) about
# 1 GiB, the step graph's pool about 0.2 GiB; bounds: the weights plus 1.5 GiB allocated, plus 2 GiB reserved.
# The test measures the peak (torch.cuda.max_memory_allocated / max_memory_reserved) and compares it with
# these; bench/gpu_check.py prints the measured figures. After the first GPU run, set each bound to the
# measured figure plus a stated margin and write the figure here.
PEAK_ALLOCATED_GIB, PEAK_RESERVED_GIB = 1.5, 2.0


@cuda
def test_cuda_sd15_shaped_sample_and_decode_memory():
    with torch.device("cuda"):  # built in place; randomise draws from a CPU generator, outside this context
        unet, vae = UNetModel(SD15_UNET), AutoencoderKL(AutoencoderConfig())
    unet, vae = randomise(unet).half(), randomise(vae)
    gc.collect()
    torch.cuda.empty_cache()  # the UNet's fp32 copy, cached: not part of the run
    weights = sum(p.numel() * p.element_size() for m in (unet, vae) for p in m.parameters())
    schedule = TrainingSchedule("scaled_linear", 1000)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (Conditioning(torch.randn(1, 77, 768, generator=g), "") for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    latent = sample(DiffusionModel(unet, schedule, "eps", 0.18215, 4), torch.zeros(1, 4, 64, 64), cond, uncond,
                    seed=0, sampler_name="dpmpp_2m", cfg=7.5, sigmas=sampling_schedule(schedule, 4, "karras").sigmas)
    image = decode_latent(vae, latent)
    assert image.shape == (1, 512, 512, 3) and not accel._CAPTURED[unet].broken
    allocated = (torch.cuda.max_memory_allocated() - weights) / 2**30
    reserved = (torch.cuda.max_memory_reserved() - weights) / 2**30
    assert allocated <= PEAK_ALLOCATED_GIB, f"peak allocated {allocated:.2f} GiB beyond the weights > {PEAK_ALLOCATED_GIB} (an estimate)"
    assert reserved <= PEAK_RESERVED_GIB, f"peak reserved {reserved:.2f} GiB beyond the weights > {PEAK_RESERVED_GIB} (an estimate)"


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 avx512f avx512bw", False), ("fpu avx512f avx512_bf16 avx512_vnni", True),
    ("fpu amx_bf16 amx_tile", True), (None, False)])
def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    if flags is not None:
        info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert accel.cpu_has_bf16(str(info)) is expected


def test_cpu_layout_keeps_weights_usable_in_the_mode_they_were_made_in():
    """Weights made outside inference mode and converted under it are still usable outside it (LDMSample
    converts under inference mode; training and benchmarks run outside), and weights made under it convert."""
    net = torch.nn.Conv2d(3, 4, 3)
    with torch.inference_mode():
        accel.cpu_layout(net)
    assert not net.weight.is_inference() and net.weight.is_contiguous(memory_format=torch.channels_last)
    net(torch.randn(1, 3, 8, 8)).sum().backward()  # would raise for inference-mode weights
    with torch.inference_mode():
        made_inside = torch.nn.Conv2d(3, 4, 3).to(torch.float32)
        made_inside.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3), requires_grad=False)
    with torch.inference_mode():
        accel.cpu_layout(made_inside)(torch.randn(1, 3, 8, 8))


def frozen_unet(dtype):
    """A UNet whose weights need no gradient, as load_checkpoint gives them."""
    return randomise(UNetModel(UNET), 3).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_convolutions_give_the_plain_convolutions_outputs(dtype):
    """cpu_layout prepacks a frozen network's 3x3 convolutions (stride 1 and 2), not its 1x1 ones, and every
    output equals the same channels-last network run with plain nn.Conv2d (the same oneDNN kernels), for
    channels-last and NCHW inputs alike."""
    net = frozen_unet(dtype)
    plain = copy.deepcopy(net)
    with torch.inference_mode():
        accel.channels_last(plain)
        accel.cpu_layout(net)
        packed = [m for m in net.modules() if isinstance(m, accel.PrepackedConv2d)]
        convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
        assert {m.kernel_size for m in packed} == {(3, 3)} and {m.stride for m in packed} == {(1, 1), (2, 2)}
        assert len(packed) == sum(m.kernel_size != (1, 1) for m in convs) < len(convs)
        x, t, c = inputs()
        for image in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(net(image.to(dtype), t, c.to(dtype)), plain(x.to(dtype), t, c.to(dtype)),
                                       rtol=0, atol=0)


def test_a_prepacked_convolution_whose_weight_moved_runs_the_plain_path():
    """Cast after packing (a host moving the module): the packed copy is not used; cpu_layout packs again."""
    net = frozen_unet(torch.float32)
    with torch.inference_mode():
        accel.cpu_layout(net)
        conv = next(m for m in net.modules() if isinstance(m, accel.PrepackedConv2d))
        packed = conv.prepacked[0]
        net.to(torch.bfloat16)
        x = torch.randn(2, conv.in_channels, 8, 8, dtype=torch.bfloat16)
        want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(conv(x), want, rtol=0, atol=0)
        accel.cpu_layout(net)
        assert conv.prepacked[0] is not packed and conv.prepacked[0].dtype == torch.bfloat16
        torch.testing.assert_close(conv(x), want, rtol=0, atol=0)


def test_weights_being_trained_are_not_prepacked_and_frozen_ones_changed_in_place_are_not_stale():
    """A network being trained (weights with gradients) keeps plain convolutions. A frozen one changed in
    place after packing (an EMA copy's update) runs the plain path with the new weights until packed again."""
    net = randomise(UNetModel(UNET), 3)
    with torch.inference_mode():
        accel.cpu_layout(net)
    assert not any(isinstance(m, accel.PrepackedConv2d) for m in net.modules())
    net.requires_grad_(False)
    accel.cpu_layout(net)
    conv = next(m for m in net.modules() if isinstance(m, accel.PrepackedConv2d))
    x = torch.randn(2, conv.in_channels, 8, 8)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride,
                                                                     conv.padding), rtol=0, atol=0)
    accel.cpu_layout(net)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride,
                                                                     conv.padding), rtol=0, atol=1e-5)
