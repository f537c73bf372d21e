"""Training and sampling schedules: closed forms, published values and errors
(parity with diffusers is in test_diffusers_parity.py)."""
import math

import pytest
import torch

from ldm_nodes.core.schedule import BETA_SCHEDULES, SPACINGS, TrainingSchedule, sampling_schedule


def test_published_sigma_ranges():
    """SD_REFERENCE.md 5.1: sigma_min / sigma_max of each schedule at T = 1000."""
    expected = {"linear": (0.0100005, 157.41), "scaled_linear": (0.0291672, 14.6146), "cosine": (0.006425, 20291)}
    for name, (lo, hi) in expected.items():
        s = TrainingSchedule(name)
        assert s.sigma_min == pytest.approx(lo, rel=1e-4)
        assert s.sigma_max == pytest.approx(hi, rel=1e-4)


def test_cosine_alpha_bar_is_the_closed_form():
    """Nichol & Dhariwal eq. 17 directly, where the 0.999 cap is not active."""
    s, T = 0.008, 1000
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    ab = TrainingSchedule("cosine").alpha_bar
    for t in (0, 10, 500, 900):
        assert ab[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-12)


def test_alpha_bar_sigma_and_log_snr_agree():
    s = TrainingSchedule("linear", num_timesteps=50)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)
    torch.testing.assert_close(s.alpha_bar, ab)
    torch.testing.assert_close(s.sigmas, ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(s.log_snr, -2 * s.sigmas.log())


def test_sampling_schedule_alpha_bar_and_log_snr_are_those_of_its_sigmas():
    """log SNR = log(alpha_bar / (1 - alpha_bar)) at each sampling sigma (mutation testing found it unchecked)."""
    s = sampling_schedule(TrainingSchedule("scaled_linear"), 10, "karras")
    sigmas = s.sigmas[:-1].double()
    ab = 1 / (1 + sigmas**2)
    torch.testing.assert_close(s.alpha_bar[:-1].double(), ab)
    torch.testing.assert_close(s.log_snr[:-1].double(), (ab / (1 - ab)).log())


def test_zero_terminal_snr_keeps_alpha_bar_1_and_zeroes_alpha_bar_T():
    base = TrainingSchedule("scaled_linear")
    z = TrainingSchedule("scaled_linear", zero_terminal_snr=True)
    assert z.alpha_bar[-1].item() == 0.0
    assert z.alpha_bar[0].item() == pytest.approx(base.alpha_bar[0].item(), rel=1e-12)
    assert z.betas[-1].item() == pytest.approx(1.0)
    assert z.log_snr[-1].item() == -math.inf
    # sampling clamps alpha_bar_T to 2^-24 (diffusers' Euler); sigma_max = sqrt(2^24 - 1)
    assert z.sigma_max == pytest.approx(math.sqrt(2**24 - 1))
    assert torch.isfinite(z.sigmas).all()
    # sqrt(alpha_bar) is an affine map of the original one (Lin et al. 2023, Algorithm 1)
    a, b = base.alpha_bar.sqrt(), z.alpha_bar.sqrt()
    ratio = (b[1:] - b[:-1]) / (a[1:] - a[:-1])
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_t_sigma_round_trip(name):
    s = TrainingSchedule(name)
    t = torch.tensor([0.0, 0.5, 17.3, 500.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t)
    # integer t lands exactly on the table, and sigma_to_t clips out-of-range sigmas
    assert s.t_to_sigma(17.0).item() == pytest.approx(s.sigmas[17].item(), rel=1e-12)
    assert s.sigma_to_t(1e-9).item() == 0.0 and s.sigma_to_t(1e9).item() == 999.0


def test_config_round_trip():
    for s in (TrainingSchedule("linear", 500, 2e-4, 0.03), TrainingSchedule("cosine", zero_terminal_snr=True)):
        again = TrainingSchedule.from_config(s.config)
        assert again == s and torch.equal(again.betas, s.betas)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sampling_schedule_shape(spacing, steps):
    sched = sampling_schedule(TrainingSchedule("scaled_linear"), steps, spacing)
    assert sched.sigmas.shape == (steps + 1,) and sched.timesteps.shape == (steps,)
    assert sched.sigmas[-1] == 0 and (sched.sigmas[:-1] > 0).all()
    assert (sched.sigmas[1:] < sched.sigmas[:-1]).all()
    torch.testing.assert_close(TrainingSchedule("scaled_linear").t_to_sigma(sched.timesteps), sched.sigmas[:-1])
    torch.testing.assert_close(sched.alpha_bar, 1 / (1 + sched.sigmas**2))


def test_published_spacings():
    """SD_REFERENCE.md 5.2 and 5.5."""
    sd = TrainingSchedule("scaled_linear")
    assert sampling_schedule(sd, 10, "leading").timesteps.tolist() == list(range(901, 0, -100))
    assert sampling_schedule(sd, 10, "trailing").timesteps.tolist() == list(range(999, 0, -100))
    assert sampling_schedule(sd, 50, "linspace").timesteps[1].item() == pytest.approx(978.6122, abs=1e-4)
    assert sampling_schedule(sd, 10, "leading").sigmas[0].item() == pytest.approx(8.3907, abs=1e-4)
    karras = [14.6146, 9.1029, 5.4784, 3.1686, 1.7494, 0.9141, 0.4469, 0.2014, 0.0819, 0.0292, 0]
    assert sampling_schedule(sd, 10, "karras").sigmas.tolist() == pytest.approx(karras, abs=1e-4)
    exp = sampling_schedule(sd, 5, "exponential").sigmas[:-1].log()
    torch.testing.assert_close(exp[1:] - exp[:-1], (exp[1] - exp[0]).expand(4))


def test_edges_that_are_allowed():
    """The limits are inclusive where the rule says so: beta_start == beta_end (constant betas), and leading
    timesteps that end exactly at T - 1 (here k = 2, (5 - 1) 2 + offset 1 = 9 = T - 1)."""
    constant = TrainingSchedule("linear", 10, beta_start=0.01, beta_end=0.01)
    assert torch.equal(constant.betas, torch.full((10,), 0.01, dtype=torch.float64))
    assert sampling_schedule(TrainingSchedule("linear", 10), 5, "leading").timesteps[0].item() == 9


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown beta_schedule 'sqrt_linear'.*scaled_linear"):
        TrainingSchedule("sqrt_linear")
    with pytest.raises(ValueError, match="unknown spacing 'normal'.*karras"):
        sampling_schedule(TrainingSchedule(), 10, "normal")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            sampling_schedule(TrainingSchedule(), bad)
    with pytest.raises(ValueError, match="cannot exceed"):
        sampling_schedule(TrainingSchedule(num_timesteps=100), 101, "trailing")
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        TrainingSchedule("linear", beta_start=0.02, beta_end=1e-4)
