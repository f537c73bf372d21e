"""Parity with diffusers' schedulers (test-only dependency, no network).

1. Training schedules: alpha_bar and sigma for every beta_schedule, with and without zero terminal SNR.
2. Sampling schedules: timesteps and sigmas of every spacing against the diffusers scheduler that
   ARCHITECTURE.md section 3 names as its reference.
3. Whole sampling loops: our Denoiser + SAMPLERS[name] against a diffusers scheduler loop, with the same
   deterministic dummy eps/v network, the same start and the same step noise (our CPU generator and
   diffusers' `generator=` draw torch.randn of the latent's shape in step order).

Conventions (SD_REFERENCE.md 5.2-5.5):
* We work in the variance-exploding scale x = x0 + sigma eps and start at noise * sqrt(1 + sigma_0^2).
  DDPM, DDIM and DPM-Solver work in the variance-preserving scale x_vp = x / sqrt(1 + sigma^2), so
  their start is `noise` itself (init_noise_sigma = 1). Euler, Euler ancestral and Heun work in the VE
  scale and start at noise * init_noise_sigma, which is sqrt(1 + sigma_0^2) only for leading spacing
  (sigma_0 for trailing and linspace): the reference is pre-scaled to sqrt(1 + sigma_0^2).
  Every loop ends at sigma = 0, where both scales agree, and the final latents are compared.
* diffusers computes its schedule in float32, we compute in float64: that sets the tolerances below.
"""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

from ldm_nodes.core.denoiser import Denoiser  # noqa: E402
from ldm_nodes.core.samplers import SAMPLERS  # noqa: E402
from ldm_nodes.core.schedule import TrainingSchedule, sampling_schedule  # noqa: E402

DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
VE_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)
SHAPE = (2, 4, 8, 8)
# Full loops: outputs are O(1) (asserted). The observed max abs diffs are 4e-7..2e-5 (float32 arithmetic
# on both sides, diffusers' float32 schedule, our continuous vs its integer t); 1e-4 leaves 5x headroom
# and still catches a 0.05-0.1% change of any one coefficient of an update rule (checked by mutation).
LOOP_ATOL = 1e-4

SD = TrainingSchedule("scaled_linear")
DDPM_LINEAR = TrainingSchedule("linear")
COSINE = TrainingSchedule("cosine")
SD_ZSNR = TrainingSchedule("scaled_linear", zero_terminal_snr=True)
# The DDPM paper's Algorithm 2 run to the letter on a short chain: T = 100, every timestep visited.
SHORT_RANGE = dict(beta_start=1e-3, beta_end=0.2)
SHORT = TrainingSchedule("linear", num_timesteps=100, **SHORT_RANGE)
# DDPM's and Stable Diffusion's ranges (SD_REFERENCE 5.1); SHORT passes its own
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def diffusers_config(training, **options):
    config = dict(num_train_timesteps=training.num_timesteps,
                  beta_schedule=DIFFUSERS_BETA_SCHEDULE[training.beta_schedule],
                  rescale_betas_zero_snr=training.zero_terminal_snr)
    if training.beta_schedule != "cosine":  # written out here, not read back from the code under test
        config.update(zip(("beta_start", "beta_end"), BETA_RANGES[training.beta_schedule]))
    config.update(options)
    return config


def make_scheduler(cls, training, **options):
    # from_config ignores the keys a class lacks (Cls(**config) would raise, SD_REFERENCE 4.2).
    return cls.from_config(diffusers_config(training, **options))


# --- the dummy network ------------------------------------------------------------------------

_PATTERN = torch.linspace(-1.0, 1.0, math.prod(SHAPE[1:])).reshape(1, *SHAPE[1:])


def dummy_net(x, t, context=None, t_rule=None):
    """Deterministic, smooth, nonlinear in x and dependent on t (and on the context when given).

    t_rule: diffusers' DPM-Solver evaluates the network at integer timesteps (Karras: t(sigma) rounded)
    while our Denoiser passes the continuous log-sigma interpolated t. For those cases the network
    rounds t itself; on diffusers' already integer t that is a no-op, so both sides evaluate the same
    function at the same points. A callable t_rule maps t otherwise (see test_dpmpp_2m_loop).
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if t_rule == "round":
        t = t.round()
    elif callable(t_rule):
        t = t_rule(t)
    t = t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    # ~ x_t, as a real eps-network is at high noise: the probability-flow ODE then contracts
    # noise * sqrt(1 + sigma_max^2) to O(1) outputs, for any sigma_max
    out = (x * (0.9 + 0.1 * torch.cos(t / 300)) + 0.1 * torch.sin(t / 170 + 3 * _PATTERN)
           + 0.05 * (x * x).clamp(max=4.0))
    if context is not None:  # a token mean: invariant under match_lengths' whole-chunk repeats
        c = context.mean(dim=(1, 2)).reshape(-1, *[1] * (x.ndim - 1))
        out = out + 0.2 * c * torch.tanh(x + _PATTERN)
    return out


def net_with(t_rule):
    return lambda x, t, context=None: dummy_net(x, t, context, t_rule)


# --- the two loops ----------------------------------------------------------------------------

def run_ours(sampler, training, sched, *, prediction="eps", t_rule=None, seed=0, denoiser_kwargs=None,
             **options):
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)  # the contract: initial noise first, then the steps' noise
    x = noise * math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    denoiser = Denoiser(net_with(t_rule), training, prediction, **(denoiser_kwargs or {}))
    out = SAMPLERS[sampler](denoiser, x, sched.sigmas, generator=g, **options)
    return out, g


def run_diffusers(scheduler, steps, *, model=None, t_rule=None, seed=0, stochastic=False, step_kwargs=None):
    """A diffusers pipeline's denoising loop. model(latent_model_input, t) -> model output."""
    model = model or (lambda x, t: dummy_net(x, t, None, t_rule))
    if steps is not None:
        scheduler.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    if isinstance(scheduler, VE_SCHEDULERS):
        sigma0 = float(scheduler.sigmas.max())
        if scheduler.config.timestep_spacing == "leading":  # diffusers' own start is ours here
            assert float(scheduler.init_noise_sigma) == pytest.approx(math.sqrt(1 + sigma0**2), rel=1e-6)
        latents = noise * math.sqrt(1 + sigma0**2)  # pre-scaled (diffusers: sigma0 for trailing, linspace)
    else:
        assert scheduler.init_noise_sigma == 1.0
        latents = noise  # x_vp = x_ve / sqrt(1 + sigma_0^2)
    kwargs = dict(step_kwargs or {})
    if stochastic:
        kwargs["generator"] = g
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(model(model_input, t), t, latents, **kwargs).prev_sample
    return latents, g


def assert_same_draws(g_ours, g_ref, extra_ref_draws):
    """The generators end in the same state once ours draws the `extra_ref_draws` latents that
    diffusers drew after our last draw (at its final step, where its noise is scaled by 0)."""
    for _ in range(extra_ref_draws):
        torch.randn(SHAPE, generator=g_ours)
    assert torch.equal(g_ours.get_state(), g_ref.get_state())


def assert_loop_close(ours, ref):
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.isfinite(ours).all()
    scale = ref.abs().max().item()
    assert 0.2 < scale < 20, f"degenerate output scale {scale}"  # the O(1) outputs the tolerance assumes
    diff = (ours - ref).abs().max().item()
    print(f"max abs diff {diff:.3g}, output max {scale:.3g}")  # shown with pytest -s
    assert diff < LOOP_ATOL, f"max abs diff {diff:.3g} (output max {scale:.3g})"
    return diff


# --- 1. training schedules --------------------------------------------------------------------

# diffusers builds betas and alpha_bar in float32, we in float64. Measured against each other, diffusers'
# alpha_bar is off by <= 7.7e-7 absolute (SD_REFERENCE 5.1: 4.7e-7 for SD) and, where alpha_bar is tiny
# (the tail, and after the zero-SNR shift), by <= 4e-5 relative (the float32 cumprod over 1000 factors).
AB_ATOL, AB_RTOL = 1e-6, 1e-4


def float32_sigma_rtol(sigmas):
    """How far a sigma computed from a float32 alpha_bar may be from the float64 one. sigma^2 =
    (1 - ab) / ab, so d sigma / sigma = (d(1 - ab) / (1 - ab) - d ab / ab) / 2: the absolute error of
    alpha_bar counts relative to 1 - ab (large where sigma is small, at t ~ 0), its relative error
    counts as is (where sigma is large)."""
    alpha_bar = 1 / (1 + sigmas**2)
    return 0.5 * (AB_ATOL / (1 - alpha_bar) + AB_RTOL)


def assert_rel_close(ours, ref, rtol):
    """|ours - ref| <= rtol |ours| elementwise (rtol a tensor or a float)."""
    assert ours.shape == ref.shape
    err = (ours - ref).abs() / ours.abs()
    worst = int((err / rtol).argmax())
    assert bool((err <= rtol).all()), (
        f"relative error {float(err.flatten()[worst]):.3g} at index {worst} exceeds "
        f"{float(torch.as_tensor(rtol).expand_as(err).flatten()[worst]):.3g}")


@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zsnr"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_training_schedule(beta_schedule, zero_snr):
    ours = TrainingSchedule(beta_schedule, zero_terminal_snr=zero_snr)
    ddpm = make_scheduler(DDPMScheduler, ours)
    torch.testing.assert_close(ours.alpha_bar, ddpm.alphas_cumprod.double(), atol=AB_ATOL, rtol=0)
    assert_rel_close(ours.alpha_bar[:-1], ddpm.alphas_cumprod[:-1].double(),
                     AB_RTOL + AB_ATOL / ours.alpha_bar[:-1])
    if zero_snr:
        assert ours.alpha_bar[-1] == 0 and ddpm.alphas_cumprod[-1] == 0
        assert ours.betas[-1] == 1 and ddpm.betas[-1] == 1
        # alpha_t = alpha_bar_t / alpha_bar_(t-1): twice alpha_bar's relative error, the tail's included
        assert_rel_close(ours.alphas[:-1], ddpm.alphas[:-1].double(), 2 * AB_RTOL)
    else:  # linspace (or the cosine ratio) rounded to float32
        torch.testing.assert_close(ours.betas, ddpm.betas.double(), atol=0, rtol=1e-6)

    euler = make_scheduler(EulerDiscreteScheduler, ours)
    ref = euler.sigmas.double()  # the training sigmas, descending, then 0
    assert ref[-1] == 0 and len(ref) == 1001
    # With zero terminal SNR both clamp alpha_bar_T to 2^-24: sigma_max = sqrt(2^24 - 1) ~ 4096.
    assert_rel_close(ours.sigmas.flip(0), ref[:-1], float32_sigma_rtol(ours.sigmas.flip(0)))
    if zero_snr:
        assert ours.sigma_max == pytest.approx(float(ref[0]), rel=1e-6)
        assert ours.sigma_max == pytest.approx(math.sqrt(2.0**24 - 1), rel=1e-12)


# --- 2. sampling schedules --------------------------------------------------------------------

STEP_COUNTS = [1, 10, 25, 30]
SCHEDULES = {"sd": SD, "linear": DDPM_LINEAR, "cosine": COSINE, "sd_zsnr": SD_ZSNR}


def _check_integer_t_schedule(ours, ref):
    assert torch.equal(ours.timesteps, ref.timesteps.double())  # integer-valued, exact
    assert ours.sigmas[-1] == 0 and ref.sigmas[-1] == 0
    # at integer t log-sigma and linear-sigma interpolation both return the training sigma itself
    assert_rel_close(ours.sigmas[:-1], ref.sigmas[:-1].double(), float32_sigma_rtol(ours.sigmas[:-1]))


@pytest.mark.parametrize("steps_offset", [1, 0])
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", ["sd", "linear"])
def test_leading_spacing(name, steps, steps_offset):
    training = SCHEDULES[name]
    ours = sampling_schedule(training, steps, "leading", steps_offset)
    assert len(ours.timesteps) == steps and len(ours.sigmas) == steps + 1
    options = dict(timestep_spacing="leading", steps_offset=steps_offset)
    euler = make_scheduler(EulerDiscreteScheduler, training, **options)
    euler.set_timesteps(steps)
    _check_integer_t_schedule(ours, euler)
    for cls in (DDIMScheduler, DDPMScheduler):  # leading: DDIM, DDPM and Euler agree (integer t)
        ref = make_scheduler(cls, training, **options)
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() == ours.timesteps.long().tolist()


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", ["sd", "cosine", "sd_zsnr"])
def test_trailing_spacing(name, steps):
    training = SCHEDULES[name]
    ours = sampling_schedule(training, steps, "trailing")
    assert len(ours.timesteps) == steps and len(ours.sigmas) == steps + 1
    euler = make_scheduler(EulerDiscreteScheduler, training, timestep_spacing="trailing")
    euler.set_timesteps(steps)
    _check_integer_t_schedule(ours, euler)
    if 1000 % steps == 0:  # DDIM steps to t - T//N: the next listed timestep only when N divides T
        ddim = make_scheduler(DDIMScheduler, training, timestep_spacing="trailing")
        ddim.set_timesteps(steps)
        assert ddim.timesteps.tolist() == ours.timesteps.long().tolist()


# Trailing is round(arange(T, 0, -T/N)) - 1 in floating point, which goes wrong in two ways:
# * N = 61, 103, 121, 122, 201, ... (T = 1000; 29, 31, 58, 62, 97 for T = 100): the float arange
#   overshoots by one element ~1e-13 above 0, which becomes t = -1: N + 1 timesteps. diffusers has the
#   same overshoot (for N = 61 its Euler runs 62 steps, the last at t = -1 -> sigma_min); we ask for
#   exactly N steps and diffusers' first N.
# * N = 48, 96, 112, 144, ...: T k / N falls on an exact x.5, and the tie is decided by float error,
#   which differs between torch.arange (1000 - 45 * (1000/48) = 62.50000000000011 -> 63) and numpy's
#   arange (start + i * ((start + step) - start) = 62.4999999999982 -> 62), so t differs by 1 at a
#   few places from diffusers, the trailing reference.
@pytest.mark.parametrize("steps", [48, 61, 96, 103])
def test_trailing_spacing_float_arange(steps):
    ours = sampling_schedule(SD, steps, "trailing")
    euler = make_scheduler(EulerDiscreteScheduler, SD, timestep_spacing="trailing")
    euler.set_timesteps(steps)
    assert len(ours.timesteps) == steps, (
        f"asked for {steps} steps, got {len(ours.timesteps)}, ending {ours.timesteps[-3:].tolist()}")
    assert ours.timesteps.min() >= 0
    assert ours.timesteps.tolist() == euler.timesteps[:steps].double().tolist()


# N = 1 is left out: numpy's linspace(0, T-1, 1) is [0], so diffusers' Euler would "sample" in one step
# from sigma_min; ours takes [T-1] (torch.linspace(T-1, 0, 1)), the only useful choice.
@pytest.mark.parametrize("steps", [10, 25, 30, 50])
@pytest.mark.parametrize("name", ["sd", "linear"])
def test_linspace_spacing(name, steps):
    training = SCHEDULES[name]
    ours = sampling_schedule(training, steps, "linspace")
    euler = make_scheduler(EulerDiscreteScheduler, training, timestep_spacing="linspace")
    euler.set_timesteps(steps)
    ref_t = euler.timesteps.double()
    # diffusers' linspace is float32 and not rounded: one float32 ulp at 999 is 6e-5
    torch.testing.assert_close(ours.timesteps, ref_t, atol=1e-4, rtol=0)
    assert ours.sigmas[-1] == 0 and euler.sigmas[-1] == 0
    ours_s, ref_s = ours.sigmas[:-1], euler.sigmas[:-1].double()
    integer = ref_t == ref_t.round()
    # integer t: the training sigma itself (float32 rounding only)
    assert_rel_close(ours_s[integer], ref_s[integer], float32_sigma_rtol(ours_s[integer]))
    # fractional t: we interpolate log sigma, diffusers' Euler sigma itself. Between training sigmas
    # a ratio r apart the two interpolants differ by < (r - 1)^2 / 8 relative; at t >= 20 r < 1.03,
    # hence < 1e-4 (ARCHITECTURE 3's "rtol ~1e-4 at fractional t").
    assert (~integer).sum() == 0 or ref_t[~integer].min() > 20
    assert_rel_close(ours_s, ref_s, float32_sigma_rtol(ours_s) + 1e-4)


def assert_dpm_timesteps(dpm, ours, spacing, training):
    """What DPMSolverMultistep feeds the network: Karras t(sigma) rounded (but not for its cosine
    schedule); otherwise its float32 t(sigma) truncated by the cast to int64. Our t(sigma_max) is
    999 exactly; diffusers' float32 one is 999 or 998.99994 (-> 998), depending on the schedule."""
    ref = torch.tensor(dpm.timesteps.tolist(), dtype=torch.float64)
    if spacing == "karras" and training.beta_schedule != "cosine":
        assert torch.equal(ref, ours.timesteps.round())
        return
    t = ours.timesteps
    nearest = t.round()
    # Near an integer k the truncation may go either way: diffusers' float32 schedule moves t by
    # (relative sigma error) / (d log sigma / dt). Worst here: cosine, whose float32 sigma_min is 2.6e-4
    # off (1 - alpha_bar_0 = 4e-5 in float32), so its Karras sigma at t ~ 468 is 1.2e-4 off, i.e. t by 0.013.
    near = (t - nearest).abs() < 2e-2
    ok = torch.where(near, (ref == nearest) | (ref == nearest - 1), ref == t.floor())
    assert bool(ok.all()), (ref.tolist(), t.tolist())


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", ["sd", "linear", "cosine", "sd_zsnr"])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_karras_exponential_spacing(spacing, name, steps):
    training = SCHEDULES[name]
    ours = sampling_schedule(training, steps, spacing)
    assert len(ours.timesteps) == steps and len(ours.sigmas) == steps + 1
    assert ours.sigmas[0] == pytest.approx(training.sigma_max, rel=1e-12)
    if steps > 1:
        assert ours.sigmas[-2] == pytest.approx(training.sigma_min, rel=1e-12)
    dpm = make_scheduler(DPMSolverMultistepScheduler, training, final_sigmas_type="zero",
                         use_karras_sigmas=spacing == "karras", use_exponential_sigmas=spacing == "exponential")
    dpm.set_timesteps(steps)
    assert ours.sigmas[-1] == 0 and dpm.sigmas[-1] == 0
    # interpolated between the training extremes, which diffusers holds in float32
    extremes = torch.tensor([training.sigma_min, training.sigma_max], dtype=torch.float64)
    assert_rel_close(ours.sigmas[:-1], dpm.sigmas[:-1].double(), float(float32_sigma_rtol(extremes).max()))
    assert_dpm_timesteps(dpm, ours, spacing, training)


# --- 3. full sampling loops -------------------------------------------------------------------

def _leading(**kw):
    return dict(timestep_spacing="leading", steps_offset=1, **kw)


DDPM_CASES = {  # id: (training, steps or None for the scheduler's own 1-per-timestep chain, config, ours)
    "leading-10": (SD, 10, _leading(), "beta_tilde"),
    "leading-50": (SD, 50, _leading(), "beta_tilde"),
    # Algorithm 2 exactly: every t from T-1 down to 0, no set_timesteps (prev = t - 1)
    "alg2-T100": (SHORT, None, SHORT_RANGE, "beta_tilde"),
    # fixed_large (sigma_t^2 = beta_t): only comparable where diffusers' last step adds no noise (t = 0);
    # with leading's final t = 1 it adds sqrt(1 - alpha_bar_1) z, where Algorithm 2 has z = 0.
    "alg2-T100-beta": (SHORT, None, SHORT_RANGE, "beta"),
}


@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_loop(case):
    training, steps, config, variance = DDPM_CASES[case]
    variance_type = {"beta_tilde": "fixed_small", "beta": "fixed_large"}[variance]
    scheduler = make_scheduler(DDPMScheduler, training, clip_sample=False, variance_type=variance_type,
                               **config)
    n = steps or training.num_timesteps
    offset = config.get("steps_offset", 0)
    sched = sampling_schedule(training, n, "leading", offset)
    ref, g_ref = run_diffusers(scheduler, steps, stochastic=True)
    assert len(scheduler.timesteps) == n
    ours, g_ours = run_ours("ddpm", training, sched, variance=variance)
    # diffusers draws whenever t > 0, so also at leading's final t = 1 (variance clamped to 1e-20 there,
    # i.e. 1e-10 * z); we skip that draw. It is the last draw, so no other draw shifts.
    assert_same_draws(g_ours, g_ref, extra_ref_draws=1 if offset else 0)
    assert_loop_close(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("leading", 25), ("trailing", 10)])
def test_ddim_loop(spacing, steps, eta):
    config = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    # set_alpha_to_one=True: the last step lands on alpha_bar = 1 (sigma = 0), as ours does (SD_REFERENCE 5.4)
    scheduler = make_scheduler(DDIMScheduler, SD, clip_sample=False, set_alpha_to_one=True, **config)
    sched = sampling_schedule(SD, steps, spacing, config["steps_offset"])
    ref, g_ref = run_diffusers(scheduler, steps, stochastic=True, step_kwargs={"eta": eta})
    ours, g_ours = run_ours("ddim", SD, sched, eta=eta)
    # with eta > 0 diffusers also draws at its last step (std 0 there); we do not
    assert_same_draws(g_ours, g_ref, extra_ref_draws=1 if eta > 0 else 0)
    assert_loop_close(ours, ref)


@pytest.mark.parametrize("steps", [10, 25])
def test_plms_loop(steps):
    """PLMS (not in the brief's list, but in ARCHITECTURE 3's samplers): PNDMScheduler with
    skip_prk_steps=True evaluates at t0, t1, t1, t2, ... (N + 1 calls: the first step is the
    pseudo improved Euler step), each transfer being DDIM's eta = 0 one."""
    scheduler = make_scheduler(PNDMScheduler, SD, skip_prk_steps=True, set_alpha_to_one=True,
                               timestep_spacing="leading", steps_offset=1)
    ref, _ = run_diffusers(scheduler, steps)
    assert len(scheduler.timesteps) == steps + 1
    ours, _ = run_ours("plms", SD, sampling_schedule(SD, steps, "leading", 1))
    assert_loop_close(ours, ref)


EULER_TYPE = {"euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
              "heun": HeunDiscreteScheduler}


@pytest.mark.parametrize("spacing,steps",
                         [("leading", 10), ("trailing", 10), ("trailing", 25), ("linspace", 25)])
@pytest.mark.parametrize("sampler", list(EULER_TYPE))
def test_euler_type_loop(sampler, spacing, steps):
    config = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler = make_scheduler(EULER_TYPE[sampler], SD, **config)
    sched = sampling_schedule(SD, steps, spacing, config["steps_offset"])
    stochastic = sampler == "euler_ancestral"
    ref, g_ref = run_diffusers(scheduler, steps, stochastic=stochastic)
    # Heun: 2N - 1 network calls in diffusers (t0, t1, t1, ..., t_{N-1}), plain Euler into sigma = 0
    assert len(scheduler.timesteps) == (2 * steps - 1 if sampler == "heun" else steps)
    ours, g_ours = run_ours(sampler, SD, sched)
    # Euler ancestral: diffusers draws at every step, also the last (sigma_up = 0 there)
    assert_same_draws(g_ours, g_ref, extra_ref_draws=1 if stochastic else 0)
    # linspace: both networks see the same fractional t, but diffusers' sigma there is linearly
    # interpolated (ours log-linearly, < 2e-5 relative apart at t >= 41): still well inside 1e-4.
    assert_loop_close(ours, ref)


# lower_order_final: with final_sigmas_type="zero" diffusers takes a first-order step into sigma = 0 whatever
# lower_order_final says (it only adds the < 15 steps rule, and lower_order_second matters for order 3
# only), which is ours: all four Karras SD variants must match the same loop of ours.
DPM_CASES = {  # id: (training, spacing, steps, extra scheduler config)
    "karras-10": (SD, "karras", 10, {}),  # < 15 steps: lower_order_final applies
    "karras-20": (SD, "karras", 20, {}),  # >= 15 steps: final_sigmas_type="zero" alone forces order 1
    "karras-20-no-lower-order-final": (SD, "karras", 20, {"lower_order_final": False}),
    "karras-10-no-lower-order-final": (SD, "karras", 10, {"lower_order_final": False}),
    "karras-25-linear": (DDPM_LINEAR, "karras", 25, {}),
    "exponential-10": (SD, "exponential", 10, {}),
    "exponential-30": (SD, "exponential", 30, {}),
}


@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpmpp_2m_loop(case):
    training, spacing, steps, extra = DPM_CASES[case]
    scheduler = make_scheduler(DPMSolverMultistepScheduler, training, algorithm_type="dpmsolver++",
                               solver_order=2, final_sigmas_type="zero", use_karras_sigmas=spacing == "karras",
                               use_exponential_sigmas=spacing == "exponential", **extra)
    sched = sampling_schedule(training, steps, spacing)
    scheduler.set_timesteps(steps)
    assert_dpm_timesteps(scheduler, sched, spacing, training)
    if spacing == "karras":
        # DPM feeds the network t(sigma) rounded: the network rounds our continuous t too (a no-op on
        # diffusers' integer t).
        t_rule = "round"
    else:
        # exponential: DPM feeds t(sigma) truncated by an int64 cast, which at t(sigma_max) = 999 turns
        # its float32 998.99994 into 998 (assert_dpm_timesteps). The network is handed diffusers' integer
        # timestep for each of our (float32) timesteps: this case checks the update rule, the t mapping
        # is checked above.
        lookup = dict(zip(sched.timesteps.float().tolist(), scheduler.timesteps.tolist()))
        t_rule = lambda t: torch.tensor([float(lookup.get(v, v)) for v in t.float().tolist()],  # noqa: E731
                                        dtype=torch.float64)
    ref, _ = run_diffusers(scheduler, steps, t_rule=t_rule)
    ours, _ = run_ours("dpmpp_2m", training, sched, t_rule=t_rule)
    assert_loop_close(ours, ref)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_sde_loop(steps):
    scheduler = make_scheduler(DPMSolverMultistepScheduler, SD, algorithm_type="sde-dpmsolver++",
                               solver_order=2, final_sigmas_type="zero", use_karras_sigmas=True)
    sched = sampling_schedule(SD, steps, "karras")
    ref, g_ref = run_diffusers(scheduler, steps, t_rule="round", stochastic=True)
    ours, g_ours = run_ours("dpmpp_2m_sde", SD, sched, t_rule="round")
    # diffusers draws at every step, also into sigma = 0 (where sigma_t = 0 scales it away)
    assert_same_draws(g_ours, g_ref, extra_ref_draws=1)
    assert_loop_close(ours, ref)


@pytest.mark.parametrize("sampler,cls,training,spacing", [
    ("ddim", DDIMScheduler, SD, "leading"),
    ("euler", EulerDiscreteScheduler, SD, "leading"),
    # zero terminal SNR needs v: both sides clamp alpha_bar_T to 2^-24 (DDIM would use 0 exactly)
    ("euler", EulerDiscreteScheduler, SD_ZSNR, "trailing"),
], ids=["ddim-sd-leading", "euler-sd-leading", "euler-zsnr-trailing"])
def test_v_prediction_loop(sampler, cls, training, spacing):
    offset = 1 if spacing == "leading" else 0
    scheduler = make_scheduler(cls, training, prediction_type="v_prediction", clip_sample=False,
                               set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=offset)
    sched = sampling_schedule(training, 10, spacing, offset)
    ref, _ = run_diffusers(scheduler, 10)
    ours, _ = run_ours(sampler, training, sched, prediction="v")
    assert_loop_close(ours, ref)


def _contexts():
    g = torch.Generator("cpu").manual_seed(7)
    cond = torch.randn(1, 3, 8, generator=g) + 0.5
    uncond = torch.randn(1, 2, 8, generator=g)  # another length: exercises match_lengths
    return cond, uncond


def _cfg_model(cond, uncond, scale, rescale):
    """diffusers' StableDiffusionPipeline: one batch [uncond, cond], noise_pred = u + s (c - u),
    then rescale_noise_cfg."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    def model(x, t):
        b = x.shape[0]
        # diffusers batches [uncond, cond] in one call; with contexts of different lengths (ours repeats
        # them to a common length) the two halves run separately: the dummy network is per-sample anyway.
        out_u, out_c = dummy_net(x, t, uncond.expand(b, -1, -1)), dummy_net(x, t, cond.expand(b, -1, -1))
        guided = out_u + scale * (out_c - out_u)
        if rescale > 0:
            guided = rescale_noise_cfg(guided, out_c, guidance_rescale=rescale)
        return guided

    return model


@pytest.mark.parametrize("case", ["ddim-cfg", "euler-cfg", "euler-zsnr-v-cfg-rescale"])
def test_cfg_loop(case):
    cond, uncond = _contexts()
    sampler, training, spacing, prediction, rescale = {
        "ddim-cfg": ("ddim", SD, "leading", "eps", 0.0),
        "euler-cfg": ("euler", SD, "leading", "eps", 0.0),
        # Lin et al.'s recipe: zero terminal SNR, v prediction, trailing spacing, guidance_rescale 0.7
        "euler-zsnr-v-cfg-rescale": ("euler", SD_ZSNR, "trailing", "v", 0.7),
    }[case]
    cls = DDIMScheduler if sampler == "ddim" else EulerDiscreteScheduler
    offset = 1 if spacing == "leading" else 0
    scheduler = make_scheduler(cls, training, clip_sample=False, set_alpha_to_one=True,
                               timestep_spacing=spacing, steps_offset=offset,
                               prediction_type="v_prediction" if prediction == "v" else "epsilon")
    ref, _ = run_diffusers(scheduler, 10, model=_cfg_model(cond, uncond, 7.5, rescale))
    sched = sampling_schedule(training, 10, spacing, offset)
    ours, _ = run_ours(sampler, training, sched, prediction=prediction,
                       denoiser_kwargs=dict(cond=cond, uncond=uncond, cfg=7.5, guidance_rescale=rescale))
    assert_loop_close(ours, ref)


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from ldm_nodes.core.denoiser import rescale_guidance

    g = torch.Generator("cpu").manual_seed(3)
    cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g) * 0.5
    guided = uncond + 7.5 * (cond - uncond)
    for phi in (0.0, 0.7, 1.0):
        # identical float32 formula up to the order of operations: a few ulps
        torch.testing.assert_close(rescale_guidance(guided, cond, phi),
                                   rescale_noise_cfg(guided, cond, guidance_rescale=phi), atol=1e-5, rtol=1e-5)
