"""LDMSamplerSelect: the pack's samplers as ComfyUI's SAMPLER (k-diffusion's sampling-function
convention, comfy/samplers.py KSAMPLER), and LDMSample with linked sigmas that stop above 0.
The real-ComfyUI run (SamplerCustom on a core MODEL) and the test of comfy_host.ComfyHost against
ComfyUI's own modules are in tests/test_comfyui.py."""
import pytest
import torch

from ldm_nodes.core.pipeline import ScheduleSpec, run_sigmas
from ldm_nodes.core.samplers import SAMPLERS
from ldm_nodes.nodes import LDMSamplerSelect, host
from ldm_nodes.nodes.sampler_select import k_diffusion_sampler

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0])


class Model:
    """ComfyUI's model_k: model(x, sigma [batch], **extra_args) -> denoised; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **extra_args):
        self.calls.append((sigma, extra_args))
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)  # the exact x0 estimate for x0 ~ N(0, 1)


def denoiser(x, sigma):
    return x / (1 + sigma**2)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_sampling_function_is_the_pack_sampler_with_the_seed_of_extra_args(name):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    (function,) = LDMSamplerSelect().select(name, -1.0, "beta")
    model, steps = Model(), []
    got = function(model, x, SIGMAS, extra_args={"seed": 5, "model_options": {"k": 1}},
                   callback=steps.append, disable=True)
    options = {"variance": "beta"} if name == "ddpm" else {}
    want = SAMPLERS[name](denoiser, x, SIGMAS, generator=torch.Generator("cpu").manual_seed(5), **options)
    torch.testing.assert_close(got, want)
    sigma, extra = model.calls[0]
    assert sigma.shape == (2,) and float(sigma[0]) == pytest.approx(14.6)  # one sigma per batch item
    assert extra == {"seed": 5, "model_options": {"k": 1}}  # conditioning and options passed through
    assert [s["i"] for s in steps] == list(range(len(SIGMAS) - 1)) and {"x", "denoised"} <= set(steps[0])


def test_options_reach_the_sampler_and_differ():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 14.6
    runs = {}
    for variance, eta in (("beta_tilde", -1.0), ("beta", -1.0), ("beta", 0.0)):
        (function,) = LDMSamplerSelect().select("ddpm", eta, variance)
        runs[variance, eta] = function(Model(), x, SIGMAS, extra_args={"seed": 3})
    assert not torch.equal(runs["beta_tilde", -1.0], runs["beta", -1.0])
    (function,) = LDMSamplerSelect().select("ddpm", 0.0, "beta")  # eta 0: no step noise, the seed is moot
    assert torch.equal(runs["beta", 0.0], function(Model(), x, SIGMAS, extra_args={"seed": 9}))
    (function,) = LDMSamplerSelect().select("ddpm", -1.0, "beta")
    assert not torch.equal(runs["beta", -1.0], function(Model(), x, SIGMAS, extra_args={"seed": 9}))


def test_an_eta_the_sampler_lacks_is_refused():
    with pytest.raises(ValueError, match="eta: the plms sampler takes no eta"):
        LDMSamplerSelect().select("plms", 0.5, "beta_tilde")


def test_the_host_builds_the_sampler_object():
    """Inside ComfyUI the host wraps the function in comfy.samplers.KSAMPLER (comfy_host.py)."""

    class Wrapped:
        def __init__(self, function):
            self.sampler_function = function

    class Host(host.Host):
        def sampler(self, function):
            return Wrapped(function)

    saved = host.current()
    host.configure(Host())
    try:
        (sampler,) = LDMSamplerSelect().select("plms", -1.0, "beta_tilde")
    finally:
        host.configure(saved)
    assert isinstance(sampler, Wrapped) and sampler.sampler_function.__name__ == "sample_ldm_plms"


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_sampling_to_a_sigma_above_0_stops_there_as_k_diffusion_does(name):
    """The first part of SplitSigmas ends above 0: a run stops at that noise level, and the second
    part continues from it to the same result as the whole run (deterministic samplers)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 14.6
    function = k_diffusion_sampler(name, {})
    middle = function(Model(), x, SIGMAS[:4])
    assert middle.std() > 0.5  # still noisy at sigma 1.0
    whole = function(Model(), x, SIGMAS)
    if name != "dpmpp_2m":  # a multistep method restarts its history at the split
        torch.testing.assert_close(function(Model(), middle, SIGMAS[3:]), whole)


class StubModel:
    prediction = "eps"
    schedule = None


def test_linked_sigmas_may_end_above_0_but_must_descend():
    spec = ScheduleSpec("model", 10, "karras")
    assert run_sigmas(StubModel(), spec, 1.0, SIGMAS[:4]).tolist() == pytest.approx(SIGMAS[:4].tolist())
    with pytest.raises(ValueError, match="sigmas: must be descending"):
        run_sigmas(StubModel(), spec, 1.0, SIGMAS[:4].flip(0))  # FlipSigmas: ascending, sampling backwards
