"""The denoiser wrapper: from a network trained on the DDPM process to D(x, sigma) ~ E[x0 | x].

The network sees the variance-preserving input x_t = sqrt(alpha_bar) x with alpha_bar = 1 / (1 + sigma^2)
and the (fractional) timestep t of sigma under its own training schedule (log-sigma interpolation,
clipped to the trained range), and predicts eps, v or x0:
    eps: x0 = x - sigma * eps                                   (x = x0 + sigma * eps)
    v:   x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  v = sqrt(ab) eps - sqrt(1 - ab) x0  (Salimans & Ho 2022)
    x0:  x0 = output
Classifier-free guidance (Ho & Salimans 2022): out = out_u + cfg (out_c - out_u), in one batched
network call; guidance rescale (Lin et al. 2023, section 3.4) pulls the guided output's standard
deviation back towards the conditional one.
"""
import math

import torch

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction, schedule):
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    if prediction == "eps" and schedule.zero_terminal_snr:
        raise ValueError("eps prediction is undefined with a zero terminal SNR schedule: at t = T the input "
                         "holds no signal, so x0 = (x - sigma eps) is infinity times zero; use v prediction")


def match_lengths(a, b):
    """Repeat two contexts [B, L, D] along the token axis to a common length. Repeating whole chunks
    duplicates keys and values, which leaves softmax attention unchanged."""
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    n = la * lb // math.gcd(la, lb)
    return a.repeat(1, n // la, 1), b.repeat(1, n // lb, 1)


def rescale_guidance(guided, cond, phi):
    """Lin et al. 2023, eq. 15-16: x_rescaled = x_cfg std(x_cond) / std(x_cfg); mix by phi."""
    dims = tuple(range(1, guided.ndim))
    factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (phi * factor + (1 - phi))


class Denoiser:
    """D(x, sigma) for `network(x_t, t, context) -> prediction`, with optional guidance.

    cond / uncond: contexts [1 or B, L, D]; uncond is needed when cfg != 1.
    """

    def __init__(self, network, schedule, prediction="eps", cond=None, uncond=None, cfg=1.0,
                 guidance_rescale=0.0):
        check_prediction(prediction, schedule)
        if cfg != 1.0 and uncond is None:
            raise ValueError("classifier-free guidance (cfg != 1) needs a negative (unconditional) context")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.network, self.schedule, self.prediction = network, schedule, prediction
        self.cfg, self.guidance_rescale = cfg, guidance_rescale
        self.cond, self.uncond = (cond, None) if cfg == 1.0 else match_lengths(cond, uncond)

    def timestep(self, sigma):
        return float(self.schedule.sigma_to_t(sigma))

    def __call__(self, x, sigma):
        sigma = float(sigma)
        x_t = x / math.sqrt(1 + sigma * sigma)
        out = self._guided_prediction(x_t, self.timestep(sigma))
        return self.to_x0(x, x_t, sigma, out)

    def _guided_prediction(self, x_t, t):
        b = x_t.shape[0]
        if self.uncond is None:
            return self._run(x_t, t, _batch(self.cond, b))
        context = torch.cat([_batch(self.cond, b), _batch(self.uncond, b)])
        out_c, out_u = self._run(torch.cat([x_t, x_t]), t, context).chunk(2)
        guided = out_u + self.cfg * (out_c - out_u)
        if self.guidance_rescale > 0:
            guided = rescale_guidance(guided, out_c, self.guidance_rescale)
        return guided

    def _run(self, x_t, t, context):
        timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.float32)
        return self.network(x_t, timesteps, context)

    def to_x0(self, x, x_t, sigma, out):
        if self.prediction == "eps":
            return x - sigma * out
        if self.prediction == "v":
            sqrt_ab = 1 / math.sqrt(1 + sigma * sigma)
            return sqrt_ab * x_t - sigma * sqrt_ab * out
        return out


def _batch(context, b):
    if context is None:
        return None
    return context if context.shape[0] == b else context.expand(b, -1, -1)
