"""The first run on a lent GPU, in one command, from a fresh copy of the repository with only torch installed.

    python bench/gpu_check.py --out $OUT                         # on the device, within 8 minutes
    python bench/gpu_check.py --dry-run --device cpu --out DIR   # the same steps, tiny shapes, on the CPU

Steps, in this order; each one's result (or its error) is written to OUT/gpu_check.json and
OUT/gpu_check.md as soon as it ends, so a run cut short still leaves what it did:
  1. packages: every pin of bench/gpu_requirements.txt must be importable at its version. Missing ones
     are installed from the wheel folder (--wheels, default .whl/ in the repository) with
     `pip install --no-index --no-deps --only-binary=:all: --target`: no network, nothing built, the
     device's own environment untouched. A pin without a wheel stops the run, naming it. The package
     itself is imported through an alias, not installed: a temporary folder holding a link named
     ldm_nodes to the repository goes first on sys.path and on the subprocesses' PYTHONPATH. The dry
     run installs nothing and records which pins differ from what is installed.
  2. the CUDA tests (tests/test_accel.py -k cuda; on the CPU they all skip);
  3. one seed's image from the built-in model on the CPU and on the device in fp32 for every sampler:
     max and mean difference in 1/255 (goal: max <= 2), with torch's default TF32 convolutions and
     with them off;
  4. speed, bench/speed.py's rows: the SD1.5-shaped UNet step at batch 2 and 8 (eager and replayed,
     NCHW and NHWC), the VAE decode at 512 (ours and diffusers' from the same latent on the device, to
     the image on the host) and a 30-step 512x512 image through the path LDMSample takes (its per-step
     callback, so the sampler's finite check syncs each step) with its peak memory, in fp16 and bf16,
     beside diffusers in the same process;
  5. goals: each of GOALS (and the image goal of step 3) compared with its figure; a missed goal is
     named with its figure and limit. In a dry run they are compared and reported but not counted.
Exit status: 0 when every step ran, the tests passed and every goal was met; 1 otherwise (with
--report-only, missed goals alone do not make it 1). A missing package stops the run after step 1, its
name in the report.
"""
import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PINS = REPO / "bench" / "gpu_requirements.txt"
BUILTIN = "builtin/tiny-shapes.safetensors"
PROMPT = "a small green square on the left on a white background"


def normalise(name):
    """A distribution's name as wheel files and pins compare it (PEP 503, with _ for -)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def read_pins(path=PINS):
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def python_tag():
    return f"Python {platform.python_version()} on {platform.machine()} ({platform.libc_ver()[0] or platform.system()})"


class MissingPackages(RuntimeError):
    """A pin that neither the environment nor the wheel folder provides: nothing after step 1 can run."""


def install(pins, wheels, site):
    """Install each pin not present at its version from the wheel folder into `site` (put first on
    sys.path). Returns {name: version} installed; stops the run when a wheel is missing."""
    missing = {name: version for name, version in pins.items() if installed_version(name) != version}
    if not missing:
        return {}
    found = set()
    if wheels.is_dir():
        for wheel in wheels.glob("*.whl"):
            name, version = wheel.name.split("-")[:2]
            found.add((normalise(name), version))
    absent = sorted(f"{name}=={version}" for name, version in missing.items() if (name, version) not in found)
    if absent:
        raise MissingPackages(f"the wheel folder {wheels} has no wheel for {', '.join(absent)}; make it as "
                              f"bench/README.md says (this is {python_tag()})")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--target", str(site), "--find-links", str(wheels),
               *(f"{name}=={version}" for name, version in missing.items())]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise MissingPackages(f"pip could not install from {wheels} for {python_tag()} (wheels made for another "
                              f"Python or platform?):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    wrong = sorted(f"{name}: {installed_version(name)} instead of {version}" for name, version in missing.items()
                   if installed_version(name) != version)
    if wrong:
        raise MissingPackages(f"installed, but another version is imported first: {'; '.join(wrong)}")
    return missing


def alias_package(folder):
    """`import ldm_nodes` imports this repository: a link named ldm_nodes in `folder`, first on sys.path."""
    (folder / "ldm_nodes").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(folder))


class Report:
    """The JSON and the markdown under --out, rewritten after every step."""

    def __init__(self, out, header):
        self.out, self.data, self.failed = out, {"header": header, "steps": {}}, False
        out.mkdir(parents=True, exist_ok=True)

    def step(self, name, fn, *args):
        """Run fn(*args) as one step: its result, or its error, and its seconds."""
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result, ok = fn(*args), True
        except Exception:  # a step that breaks must not take the others' results with it
            result, ok = {"error": traceback.format_exc()}, False
            print(result["error"], file=sys.stderr)
        ok = ok and result.get("ok", True)
        self.failed |= not ok
        self.data["steps"][name] = {"ok": ok, "seconds": round(time.perf_counter() - start, 1), **result}
        self.write()

    def write(self):
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def markdown(data):
    head = data["header"]
    lines = ["# bench/gpu_check.py", "", f"`{head['command']}`", "",
             f"{head.get('device', 'device not read yet')}; torch {head.get('torch', '?')}; {head['python']}; "
             f"{head['date']}", ""]
    for name, step in data["steps"].items():
        lines += [f"## {name}: {'ok' if step['ok'] else 'FAILED'} ({step['seconds']} s)", ""]
        if "error" in step:
            lines += ["```", step["error"].rstrip(), "```", ""]
        if "table" in step:
            lines += [step["table"], ""]
        if step.get("missed"):
            lines += [step["missed"], ""]
        if "summary" in step:
            lines += [f"`{step['command']}`: {step['summary']}", ""]
            if not step["ok"]:
                lines += ["```", step["output"].rstrip(), "```", ""]
    return "\n".join(lines)


def packages(pins, wheels, site, dry_run):
    if dry_run:
        differ = {name: {"pinned": v, "installed": installed_version(name)} for name, v in pins.items()
                  if installed_version(name) != v}
        return {"installed": {}, "differ_from_pins": differ}
    return {"installed": install(pins, wheels, site)}


def cuda_tests(env, device):
    """tests/test_accel.py's test_cuda_* in a subprocess; on CUDA they must run, not all skip."""
    command = [sys.executable, "-m", "pytest", "--rootdir=tests", "-p", "no:cacheprovider", "-rs",
               "tests/test_accel.py", "-k", "test_cuda_"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    counts = re.findall(r"^.*\d+ (?:passed|failed|skipped|errors?|deselected).*$", result.stdout, re.MULTILINE)
    summary = counts[-1] if counts else "no summary"
    ran = device.type != "cuda" or " passed" in summary
    return {"ok": result.returncode == 0 and ran, "command": " ".join(command[2:]), "exit": result.returncode,
            "summary": summary, "output": result.stdout[-6000:] + result.stderr[-2000:]}


def sampler_images(device, steps, dry_run=False):
    """One seed's image per sampler from the built-in model, fp32, on the CPU and on `device`:
    differences in 1/255. On CUDA (and in a dry run, to cover the branch) with torch's default TF32
    convolutions and with them off."""
    import torch

    from ldm_nodes.core.checkpoint import load_checkpoint
    from ldm_nodes.core.pipeline import Conditioning, DiffusionModel, ScheduleSpec, decode_latent, sample
    from ldm_nodes.core.samplers import SAMPLERS
    from ldm_nodes.core.text import CLIPTokenizer, encode_prompt
    from ldm_nodes.nodes.model_paths import model_file

    path, tokenizer = model_file(BUILTIN), CLIPTokenizer()

    def images(where):
        ck = load_checkpoint(path, device=where)
        model = DiffusionModel.from_checkpoint(ck)
        sigmas = ScheduleSpec("model", steps, "karras").sigmas(ck.schedule)
        latent = torch.zeros(1, ck.vae.config.embed_dim, 64 // ck.vae.config.f, 64 // ck.vae.config.f)
        with torch.inference_mode():
            cond, uncond = (Conditioning(encode_prompt(tokenizer, ck.text_encoder, p), p) for p in (PROMPT, ""))
        return {name: decode_latent(ck.vae, sample(model, latent, cond, uncond, seed=0, sampler_name=name, cfg=5.0, sigmas=sigmas)) * 255
                for name in SAMPLERS}

    reference = images(torch.device("cpu"))
    modes = {"default": None}
    if device.type == "cuda" or dry_run:
        modes["tf32 off"] = "ieee"
    rows, worst = [], 0.0
    for mode, precision in modes.items():
        saved = torch.backends.cudnn.conv.fp32_precision
        if precision:
            torch.backends.cudnn.conv.fp32_precision = precision
        try:
            on_device = images(device)
        finally:
            torch.backends.cudnn.conv.fp32_precision = saved
        for name in SAMPLERS:
            diff = (on_device[name] - reference[name]).abs()
            rows.append({"sampler": name, "mode": mode, "max_255": diff.max().item(), "mean_255": diff.mean().item()})
            worst = max(worst, diff.max().item())
    table = ["| sampler | convolutions | max diff (1/255) | mean diff (1/255) |", "|---|---|---|---|"]
    table += [f"| {r['sampler']} | {r['mode']} | {r['max_255']:.2f} | {r['mean_255']:.3f} |" for r in rows]
    table.append(f"\nGoal: max <= {IMAGE_GOAL_255:g}/255. Worst: {worst:.2f}/255 ({steps} steps, cfg 5, {BUILTIN}, 64x64).")
    return {"rows": rows, "worst_max_255": worst, "ok": worst <= IMAGE_GOAL_255, "table": "\n".join(table)}


def speed(device, dry_run):
    import speed as bench_speed  # bench/speed.py, beside this file

    if dry_run:
        args = argparse.Namespace(repeats=1, steps=2, cfg=7.5, matmul=128)
        dtypes, shapes = ["fp32"], bench_speed.SHAPES["cpu"]
    else:
        args = argparse.Namespace(repeats=20, steps=30, cfg=7.5, matmul=0)
        dtypes, shapes = ["fp16", "bf16"], bench_speed.SHAPES["cuda"]
    rows = bench_speed.measure(device, dtypes, args, shapes, batches=(2, 8))
    return {"rows": rows, "table": bench_speed.table(rows)}


# Issue #6's goals on the lent GPU (SD1.5 shapes): (name, the speed row's "what", its dtype, how to read the
# figure from the row, the limit, the unit). Each is compared; a missed one is named with its figure and
# makes the exit status 1 (unless --report-only).
IMAGE_GOAL_255 = 2.0  # CPU vs device image, every sampler: largest pixel difference
GOALS = [
    ("UNet CFG step, batch 2, fp16", "UNet step, batch 2", "fp16",
     lambda r: min(r["ours_fast"], r["ours_fast_nhwc"]), 4.0, "ms"),
    ("UNet step, batch 8, fp16", "UNet step, batch 8", "fp16",
     lambda r: min(r["ours_fast"], r["ours_fast_nhwc"]), 14.0, "ms"),
    ("VAE decode at 512, bf16", "VAE decode, bf16", "bf16", lambda r: min(r["ours"], r["ours_nhwc"]), 8.0, "ms"),
    ("30-step 512x512 image, fp16 (LDMSample's path)", "whole image, 30 CFG steps", "fp16",
     lambda r: r["ours"], 150.0, "ms"),
    ("peak memory of the whole image, fp16 (allocated by torch)", "whole image, 30 CFG steps", "fp16",
     lambda r: r["ours_peak_allocated_gib"], 3e9 / 2**30, "GiB"),
]


def judge(steps, dry_run):
    """Every goal against its figure: [{"goal", "figure", "limit", "unit", "met"}]. A goal whose step or
    row is missing is missed (figure None): a goal is never passed by default. In a dry run the shapes
    and the device are not the goals' (tiny shapes on the CPU): each goal is still read and compared,
    and reported, but not counted."""
    results = []
    images = steps.get("CPU and device images, every sampler", {})
    figure = images.get("worst_max_255")
    results.append({"goal": "CPU vs device image, every sampler (max diff)", "figure": figure,
                    "limit": IMAGE_GOAL_255, "unit": "/255", "met": figure is not None and figure <= IMAGE_GOAL_255})
    rows = steps.get("speed", {}).get("rows", [])
    for name, what, dtype, read, limit, unit in GOALS:
        if dry_run:  # the dry run's rows: fp32, fewer steps; read the same kind of row
            what = "whole image" if what.startswith("whole image") else what.replace("bf16", "fp32")
            dtype = "fp32"
        row = next((r for r in rows if r["what"].startswith(what) and r["dtype"] == dtype), None)
        try:
            figure = read(row) if row is not None else None
        except KeyError:  # e.g. no peak memory off CUDA
            figure = None
        results.append({"goal": name, "figure": figure, "limit": limit, "unit": unit,
                        "met": figure is not None and figure <= limit})
    return results


def goals_step(steps, dry_run):
    results = judge(steps, dry_run)
    missed = [g for g in results if not g["met"]]
    table = ["| goal | figure | limit | met |", "|---|---|---|---|"]
    table += [f"| {g['goal']} | {'missing' if g['figure'] is None else format(g['figure'], '.3g')} {g['unit']} | "
              f"<= {g['limit']:.3g} {g['unit']} | {'yes' if g['met'] else 'NO'} |" for g in results]
    if dry_run:
        table.append("\nDry run: tiny shapes on another device, so the goals are compared but not counted.")
    summary = "; ".join(f"MISSED {g['goal']}: {'missing' if g['figure'] is None else format(g['figure'], '.3g')} "
                        f"{g['unit']} > {g['limit']:.3g} {g['unit']}" for g in missed)
    return {"ok": dry_run or not missed, "goals": results, "missed": summary, "table": "\n".join(table)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="the wheel folder (bench/README.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, few steps and repeats, nothing installed: checks the script itself")
    parser.add_argument("--report-only", action="store_true",
                        help="exit 0 when only goals were missed (they are still named in the report)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    alias_package(work)
    sys.path.insert(1, str(REPO / "bench"))  # bench/speed.py, also when this file is not run as the script
    site = work / "site"
    report = Report(args.out, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "python": python_tag(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run})
    report.step("packages", packages, read_pins(), args.wheels, site, args.dry_run)
    if report.failed:
        sys.exit(f"gpu_check: stopped after step 1; see {args.out / 'gpu_check.md'}")

    import torch  # after the packages: torch imports numpy when it can, and it must be the pinned one

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch; use --dry-run --device cpu to check the script")
    report.data["header"].update(torch=torch.__version__, device=torch.cuda.get_device_name(device)
                                 if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads")
    paths = [str(work), str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    report.step("CUDA tests", cuda_tests, env, device)
    report.step("CPU and device images, every sampler", sampler_images, device, 3 if args.dry_run else 20, args.dry_run)
    report.step("speed", speed, device, args.dry_run)
    failed_before_goals = report.failed
    report.step("goals", goals_step, report.data["steps"], args.dry_run)
    print((args.out / "gpu_check.md").read_text())
    missed = report.data["steps"]["goals"].get("missed")
    if missed:
        print(f"gpu_check: {missed}", file=sys.stderr)
    if failed_before_goals or (report.failed and not args.report_only):
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
