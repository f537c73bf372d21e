"""HTTP routes of the pack (aiohttp), over core/: what the JS panel plots.

GET /ldm/schedule  (ComfyUI also serves it as /api/ldm/schedule)

Query parameters (each at most once; unknown ones are ignored):
  beta_schedule      required: model | linear | scaled_linear | cosine (diffusers' names; ComfyUI's
                     "linear" is scaled_linear here, its "sqrt_linear" is linear)
  steps              required: integer 1..1000, the number of sampling steps
  spacing            required: leading | trailing | linspace | karras | exponential
  zero_terminal_snr  optional: true | false (also 1 | 0), default false
  ckpt_name          required when beta_schedule=model: a model name as LDMLoadModel lists it,
                     resolved with the loader's checks (model_paths.resolve_model); the training
                     schedule is read from the file's safetensors header, never its weights. With
                     another beta_schedule it is optional and gives the number of training
                     timesteps, as a linked model does on LDMNoiseSchedule.
  num_timesteps      optional: integer 2..10000, the number of training timesteps of a named
                     beta_schedule; default: the ckpt_name model's, else 1000. Ignored for model.

The schedule is the one LDMNoiseSchedule samples with (core.pipeline.ScheduleSpec): for `model`
the file's betas, zero-terminal-SNR rescaled when either the file or the request says so; for a
named schedule its default beta range over num_timesteps, rescaled when zero_terminal_snr is true.
Sampling uses core.schedule.sampling_schedule with its default steps_offset (1, for leading).

Response 200, JSON:
  beta_schedule      the resolved training schedule's name ("model" becomes the file's, e.g. "scaled_linear")
  requested_beta_schedule, spacing, zero_terminal_snr (effective), num_timesteps (T),
  beta_start, beta_end (null for cosine), ckpt_name (or null)
  t                  integer timesteps of the curves: all of 0..T-1 when T <= 512 (MAX_POINTS), else
                     round(linspace(0, T-1, 512)): 512 evenly spaced ones, first 0 and last T-1.
  alpha_bar, sigma, log_snr   TrainingSchedule.alpha_bar / .sigmas / .log_snr at those t.
                     sigma uses core's clamp of alpha_bar_T to 2^-24 under zero terminal SNR
                     (sigma_max ~ 4096), the value samplers use.
  subsampled         true when t is not every timestep
  steps              {"timesteps": [...] one per step, descending, possibly fractional;
                      "sigmas": [...] steps + 1 values, descending, ending at 0 (ComfyUI's SIGMAS);
                      "alpha_bar", "log_snr": [...] one per step, at sigmas[i] (1 / (1 + sigma^2) and
                      -2 log sigma), i.e. where each step's marker sits}
Non-finite values are JSON null: log_snr is -inf at t = T-1 under zero terminal SNR
(alpha_bar_T = 0 exactly), and no other output is infinite; null never stands for anything else.

Errors: HTTP 400, {"error": "<parameter>: <what is wrong>"}; the message starts with the
parameter's name.
"""
import asyncio
import functools
import json
import math
import re

import torch
from aiohttp import web

from . import model_paths
from ..core import checkpoint
from ..core.pipeline import ScheduleSpec
from ..core.schedule import SPACINGS, TrainingSchedule, sampling_schedule

SCHEDULE_PATH = "/ldm/schedule"
STEPS_RANGE = (1, 1000)
NUM_TIMESTEPS_RANGE = (2, 10000)
DEFAULT_NUM_TIMESTEPS = 1000
MAX_POINTS = 512
MAX_NAME_LENGTH = 1024
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_INTEGER = re.compile(r"[0-9]{1,6}")


class BadRequest(ValueError):
    """A request error whose message starts with the parameter's name."""


def _one(query, name, required=False):
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name}: given {len(values)} times; give it once")
    if not values:
        if required:
            raise BadRequest(f"{name}: missing (required)")
        return None
    return values[0]


def _choice(query, name, choices):
    value = _one(query, name, required=True)
    if value not in choices:
        raise BadRequest(f"{name}: unknown value {value[:64]!r}; choose one of: {', '.join(choices)}")
    return value


def _integer(query, name, bounds, required=True):
    value = _one(query, name, required)
    if value is None:
        return None
    lo, hi = bounds
    if not _INTEGER.fullmatch(value) or not lo <= int(value) <= hi:
        raise BadRequest(f"{name}: must be an integer from {lo} to {hi}, got {value[:64]!r}")
    return int(value)


def _boolean(query, name):
    value = _one(query, name)
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequest(f"{name}: must be true or false, got {value[:64]!r}")


def parse_schedule_query(query):
    """Validated parameters of GET /ldm/schedule from a (multi)dict of strings; BadRequest otherwise."""
    params = {
        "beta_schedule": _choice(query, "beta_schedule", ScheduleSpec.BETA_SCHEDULE_OPTIONS),
        "steps": _integer(query, "steps", STEPS_RANGE),
        "spacing": _choice(query, "spacing", SPACINGS),
        "zero_terminal_snr": _boolean(query, "zero_terminal_snr"),
        "ckpt_name": _one(query, "ckpt_name"),
        "num_timesteps": None,
    }
    if params["beta_schedule"] != "model":
        params["num_timesteps"] = _integer(query, "num_timesteps", NUM_TIMESTEPS_RANGE, required=False)
    name = params["ckpt_name"]
    if name is not None and len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"ckpt_name: longer than {MAX_NAME_LENGTH} characters")
    if params["beta_schedule"] == "model" and not name:
        raise BadRequest("ckpt_name: required when beta_schedule=model (link an LDMLoadModel node to the "
                         "schedule node's model input)")
    return params


def model_schedule(ckpt_name):
    """The training schedule in a model file's header (never its weights), with the loader's name and header checks."""
    try:
        path = model_paths.resolve_model(ckpt_name)
    except ValueError as e:
        message = str(e)
        raise BadRequest(message if message.startswith("ckpt_name") else f"ckpt_name: {message}") from None
    try:  # the loader's own header validator: a file the loader refuses is refused here too
        return checkpoint.read_header(path).schedule
    except checkpoint.CheckpointError as e:
        raise BadRequest(f"ckpt_name: {ckpt_name!r} cannot be used: {e}") from None


def _finite_or_none(values):
    return [v if math.isfinite(v) else None for v in values]


def _floats(tensor):
    return _finite_or_none(float(v) for v in tensor.tolist())


def curve_timesteps(num_timesteps, max_points=MAX_POINTS):
    """The integer timesteps the curves are sampled at: all when T <= max_points, else max_points
    evenly spaced ones (rounded linspace), always including 0 and T-1."""
    if num_timesteps <= max_points:
        return torch.arange(num_timesteps)
    return torch.linspace(0, num_timesteps - 1, max_points, dtype=torch.float64).round().long().unique()


def schedule_json(params):
    """The response body of GET /ldm/schedule for validated parameters (see the module docstring)."""
    needs_model = params["beta_schedule"] == "model" or params["num_timesteps"] is None
    model = model_schedule(params["ckpt_name"]) if params["ckpt_name"] and needs_model else None
    spec = ScheduleSpec(params["beta_schedule"], params["steps"], params["spacing"], params["zero_terminal_snr"])
    if params["beta_schedule"] != "model" and params["num_timesteps"] is not None:
        training = TrainingSchedule(params["beta_schedule"], params["num_timesteps"],
                                    zero_terminal_snr=params["zero_terminal_snr"])
    else:
        training = spec.training(model)
    try:
        sampling = sampling_schedule(training, params["steps"], params["spacing"])
    except ValueError as e:  # more steps than training timesteps, or leading's offset pushed past T-1
        raise BadRequest(f"steps: {e}") from None
    T = training.num_timesteps
    t = curve_timesteps(T)
    return {
        "beta_schedule": training.beta_schedule,
        "requested_beta_schedule": params["beta_schedule"],
        "spacing": params["spacing"],
        "zero_terminal_snr": training.zero_terminal_snr,
        "num_timesteps": T,
        "beta_start": training.beta_start,
        "beta_end": training.beta_end,
        "ckpt_name": params["ckpt_name"],
        "subsampled": len(t) < T,
        "t": t.tolist(),
        "alpha_bar": _floats(training.alpha_bar[t]),
        "sigma": _floats(training.sigmas[t]),
        "log_snr": _floats(training.log_snr[t]),
        "steps": {
            "timesteps": _floats(sampling.timesteps),
            "sigmas": _floats(sampling.sigmas),
            "alpha_bar": _floats(sampling.alpha_bar[:-1]),
            "log_snr": _floats(sampling.log_snr[:-1]),
        },
    }


_dumps = functools.partial(json.dumps, allow_nan=False)


def error_response(message, status=400):
    return web.json_response({"error": message}, status=status, dumps=_dumps)


async def schedule_handler(request):
    """GET /ldm/schedule: a training schedule's curves and the chosen sampling steps."""
    try:
        params = parse_schedule_query(request.query)
        # Reading a header and computing up to 10000 timesteps stays off the server's event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, schedule_json, params)
    except BadRequest as e:
        return error_response(str(e))
    return web.json_response(body, dumps=_dumps)


def add_routes(routes):
    """Register the pack's routes on an aiohttp RouteTableDef (ComfyUI: PromptServer.instance.routes)."""
    routes.get(SCHEDULE_PATH)(schedule_handler)
    return routes


def make_app():
    """A plain aiohttp application with the pack's routes (tests, and use without ComfyUI)."""
    app = web.Application()
    app.add_routes(add_routes(web.RouteTableDef()))
    return app
