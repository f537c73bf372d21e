"""The fast path (core/accel.py) and reduced precision: the numbers do not change.

On the CPU: the fast path leaves the network itself in place, channels-last weights give the same
outputs, and fp16 / bf16 drift from a float64 reference stays within their rounding. On CUDA (skipped
without it): replayed graphs give the eager network's outputs, call after call, and a whole sampling
run is unchanged.
"""
import pytest
import torch

from ldm_nodes.core import accel
from ldm_nodes.core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_nodes.core.randomise import randomise
from ldm_nodes.core.transformer import TransformerConfig, TransformerModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), transformer_depth=1, context_dim=64, num_head_channels=16)
TRANSFORMER = TransformerConfig(in_channels=4, out_channels=4, width=64, depth=2, heads=4, context_dim=64,
                                base_size=8)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def inputs(batch=2, size=16, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.linspace(10.3, 937.7, batch),
            torch.randn(batch, tokens, 64, generator=g))


def networks():
    return [randomise(UNetModel(UNET)), randomise(TransformerModel(TRANSFORMER))]


def test_fast_network_is_the_network_itself_off_cuda():
    for net in networks():
        assert accel.fast_network(net) is net


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
    network on the static buffers and writes into the static output, as a graph would."""

    captures = 0

    def _eligible(self, x):
        return not torch.is_grad_enabled()

    def _side_stream(self, *inputs):
        return self.network(*inputs)

    def _capture(self, x, t, context):
        self.captures += 1
        if x.shape[0] == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        static = tuple(a.clone() for a in (x, t, context))
        out = self.network(*static)
        return type("Graph", (), {"replay": lambda _: out.copy_(self.network(*static))})(), static, out


def test_capture_bookkeeping_warmup_replay_and_fallback():
    net = networks()[0]
    captured = GraphOnCPU(net)
    with torch.inference_mode():
        outputs = []
        for seed in range(accel.WARMUP + 3):
            x, t, c = inputs(seed=seed)
            outputs.append(captured(x, t, c))
            torch.testing.assert_close(outputs[-1], net(x, t, c), rtol=0, atol=0)  # new inputs copied in
            assert len(captured.graphs) == (seed >= accel.WARMUP) and captured.captures == len(captured.graphs)
        assert not torch.equal(outputs[-1], outputs[-2])  # each call returned its own tensor, not the buffer
        for batch in (1, 4):  # other shapes get graphs of their own, up to MAX_GRAPHS
            for _ in range(accel.WARMUP + 1):
                captured(*inputs(batch=batch))
        assert len(captured.graphs) == accel.MAX_GRAPHS and captured.captures == accel.MAX_GRAPHS
        with pytest.warns(UserWarning, match="capture failed"):
            broken = GraphOnCPU(net)
            for _ in range(accel.WARMUP + 2):
                x, t, c = inputs(batch=3)
                torch.testing.assert_close(broken(x, t, c), net(x, t, c), rtol=0, atol=0)
        assert broken.broken and broken.captures == 1  # one failed capture, eager from then on


@pytest.mark.parametrize("make", [lambda: randomise(UNetModel(UNET)),
                                  lambda: randomise(AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2),
                                                                                    num_res_blocks=1)))],
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


@cuda
@pytest.mark.parametrize("index", [0, 1], ids=["unet", "transformer"])
def test_graph_replay_matches_eager_on_cuda(index):
    net = networks()[index].cuda().half()
    captured = accel.fast_network(net)
    with torch.inference_mode():
        for seed in range(accel.WARMUP + 4):
            x, t, c = (a.cuda() for a in inputs(seed=seed))
            x, c = x.half(), c.half()
            out = captured(x, t, c)
            torch.testing.assert_close(out, net(x, t, c), rtol=0, atol=0)
        assert len(captured.graphs) == 1 and not captured.broken
        kept = out.clone()
        x, t, c = (a.cuda() for a in inputs(seed=99))
        captured(x.half(), t, c.half())  # a later replay must not overwrite an output already returned
        torch.testing.assert_close(out, kept, rtol=0, atol=0)


@cuda
def test_sampling_run_is_unchanged_by_the_fast_path(monkeypatch):
    from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, sample
    from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule

    schedule = TrainingSchedule("scaled_linear", 1000)
    model = DiffusionModel(networks()[0].cuda(), schedule, "eps", 1.0, 4)
    sigmas = sampling_schedule(schedule, 8, "karras").sigmas
    latent = torch.zeros(1, 4, 16, 16)
    cond, uncond = (Conditioning(inputs(seed=s)[2][:1].cuda(), "") for s in (1, 2))
    fast = sample(model, latent, cond, uncond, seed=7, sampler_name="dpmpp_2m", cfg=5.0, sigmas=sigmas)
    monkeypatch.setattr("ldm_nodes.core.pipeline.fast_network", lambda network: network)
    eager = sample(model, latent, cond, uncond, seed=7, sampler_name="dpmpp_2m", cfg=5.0, sigmas=sigmas)
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
