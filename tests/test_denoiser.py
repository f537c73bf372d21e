"""The denoiser wrapper: prediction types, timesteps, guidance and refusals."""
import math

import pytest
import torch

from ldm_nodes.core.denoiser import Denoiser, match_lengths
from ldm_nodes.core.objective import q_sample, training_target
from ldm_nodes.core.schedule import TrainingSchedule

SCHEDULE = TrainingSchedule("scaled_linear")


class Oracle(torch.nn.Module):
    """A network that knows x0 and eps and returns the exact training target at its input."""

    def __init__(self, x0, eps, prediction):
        super().__init__()
        self.x0, self.eps, self.prediction = x0, eps, prediction
        self.seen = []

    def forward(self, x_t, t, context):
        self.seen.append((x_t, t, context))
        ab = SCHEDULE.alpha_bar[t.round().long()].float()  # the test uses integer t
        return training_target(self.x0, self.eps, ab, self.prediction)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("t", [0, 17, 500, 999])
def test_exact_prediction_gives_exact_x0(prediction, t):
    """Training target (objective.py) and output conversion (denoiser.py) are inverses."""
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = SCHEDULE.sigmas[t].item()
    x = x0 + sigma * eps  # the sampler's view of q(x_t | x0)
    net = Oracle(x0, eps, prediction)
    denoised = Denoiser(net, SCHEDULE, prediction)(x, sigma)
    torch.testing.assert_close(denoised, x0, rtol=1e-4, atol=1e-4 * max(1, sigma))
    x_t, timesteps, _ = net.seen[0]
    # the network saw the variance-preserving input of eq. 4 at the right timestep
    ab = SCHEDULE.alpha_bar[[t, t]].float()
    torch.testing.assert_close(x_t, q_sample(x0, ab, eps), rtol=1e-5, atol=1e-5)
    assert timesteps.tolist() == pytest.approx([t, t], abs=1e-6)


def linear_net(x_t, t, context):
    """Output depends on the context: its mean along tokens and width."""
    return 0.5 * x_t + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + 1e-3 * t.reshape(-1, 1, 1, 1)


def test_cfg_is_one_batched_call_and_matches_the_formula():
    calls = []

    def net(x_t, t, context):
        calls.append(x_t.shape[0])
        return linear_net(x_t, t, context)

    cond, uncond = torch.full((1, 3, 8), 2.0), torch.full((1, 3, 8), -1.0)
    x = torch.randn(2, 4, 5, 5)
    d = Denoiser(net, SCHEDULE, "eps", cond, uncond, cfg=7.5)(x, 3.0)
    assert calls == [4]
    plain = lambda c: Denoiser(linear_net, SCHEDULE, "eps", c)(x, 3.0)
    x0_c, x0_u = plain(cond), plain(uncond)
    torch.testing.assert_close(d, x0_u + 7.5 * (x0_c - x0_u))  # eps is affine in x0: same combination


def test_cfg_1_runs_only_the_conditional_branch():
    calls = []
    net = lambda x_t, t, c: calls.append(c) or linear_net(x_t, t, c)
    Denoiser(net, SCHEDULE, "eps", torch.ones(1, 3, 8), torch.zeros(1, 3, 8), cfg=1.0)(torch.zeros(1, 4, 2, 2), 1.0)
    assert len(calls) == 1 and calls[0].mean().item() == 1.0


def test_guidance_rescale_endpoints():
    cond, uncond = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    x = torch.randn(2, 4, 5, 5)
    plain = Denoiser(linear_net, SCHEDULE, "eps", cond, uncond, cfg=5.0)(x, 2.0)
    same = Denoiser(linear_net, SCHEDULE, "eps", cond, uncond, cfg=5.0, guidance_rescale=0.0)(x, 2.0)
    torch.testing.assert_close(plain, same)
    full = Denoiser(linear_net, SCHEDULE, "eps", cond, uncond, cfg=5.0, guidance_rescale=1.0)(x, 2.0)
    # with phi = 1 the guided eps has exactly the conditional eps's per-sample std
    eps_full, eps_c = (x - full) / 2.0, (x - Denoiser(linear_net, SCHEDULE, "eps", cond)(x, 2.0)) / 2.0
    torch.testing.assert_close(eps_full.flatten(1).std(1), eps_c.flatten(1).std(1), rtol=1e-4, atol=1e-5)


def test_contexts_of_different_lengths_are_repeated_to_a_common_one():
    a, b = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    ra, rb = match_lengths(a, b)
    assert ra.shape == rb.shape == (1, 154, 8)
    torch.testing.assert_close(ra[:, 77:], a)
    ra, rb = match_lengths(torch.randn(1, 2, 8), torch.randn(1, 3, 8))
    assert ra.shape[1] == rb.shape[1] == 6


def test_refusals():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        Denoiser(linear_net, TrainingSchedule("scaled_linear", zero_terminal_snr=True), "eps")
    Denoiser(linear_net, TrainingSchedule("scaled_linear", zero_terminal_snr=True), "v")  # fine
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        Denoiser(linear_net, SCHEDULE, "sample")
    with pytest.raises(ValueError, match="negative"):
        Denoiser(linear_net, SCHEDULE, "eps", torch.ones(1, 3, 8), None, cfg=3.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        Denoiser(linear_net, SCHEDULE, "eps", torch.ones(1, 3, 8), torch.ones(1, 3, 8), cfg=3.0, guidance_rescale=2)


def test_sigma_maps_to_fractional_timestep():
    seen = []
    net = lambda x_t, t, c: seen.append(t) or torch.zeros_like(x_t)
    sigma = SCHEDULE.t_to_sigma(123.25).item()
    Denoiser(net, SCHEDULE, "eps")(torch.zeros(1, 1, 1, 1), sigma)
    assert seen[0].item() == pytest.approx(123.25, abs=1e-3)
    assert math.isfinite(seen[0].item())


def test_guidance_on_a_batch_of_three_is_each_image_guided_alone():
    """CFG runs cond and uncond as one batch of 2B and splits it back: at B = 3 each image's guided
    result is the one it gets alone (a wrong split is invisible at B <= 2, mutation testing found)."""
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)

    def net(x_t, t, context):  # depends on the context per row
        return x_t * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    whole = Denoiser(net, SCHEDULE, "eps", cond, uncond, cfg=4.0)(x, 2.0)
    for i in range(3):
        alone = Denoiser(net, SCHEDULE, "eps", cond[i:i + 1], uncond, cfg=4.0)(x[i:i + 1], 2.0)
        torch.testing.assert_close(whole[i:i + 1], alone)


def test_guidance_rescale_uses_each_images_own_spread():
    """std over (C, H, W) per image, eq. 15-16 of Lin et al. 2023, written out (a std over the whole
    batch is the same at batch 1 only)."""
    from ldm_nodes.core.denoiser import rescale_guidance
    g = torch.Generator().manual_seed(1)
    guided, cond = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    cond[1] *= 5  # the two images' spreads differ
    want = torch.stack([gd * (0.7 * c.std() / gd.std() + 0.3) for gd, c in zip(guided, cond)])
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), want)
