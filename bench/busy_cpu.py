"""A sampling step of the command line on a quiet machine and next to a process that keeps every core busy.

    python bench/busy_cpu.py [--steps 100] [--repeats 2] [--ways pack before passive active compiled]

Runs `python -m ldm_nodes run workflows/api/txt2img.json` (the built-in model, dpmpp_2m, CFG) in fresh
processes with LDMNoiseSchedule at --steps + 1 and at 1 step; a step is the difference over --steps, so
start-up, loading and decoding cancel. Two ways of starting it:
  - pack:   `python -m ldm_nodes run ...` with no OMP_* variables: the pack's own choice (core/threads.py);
  - before: the same main() started through `python -c` with OMP_NUM_THREADS set to torch's default
            (the CPU count) and no OMP_WAIT_POLICY: what every run did before core/threads.py;
  - passive, active: `python -m ldm_nodes run ...` with OMP_WAIT_POLICY=PASSIVE (the CLI's choice before
            GOMP_SPINCOUNT) or ACTIVE, the threads still the pack's choice;
  - compiled: the pack's own start on workflows/api/txt2img_compiled.json (LDMCompileModel, core/compiled.py;
            a first, untimed run builds the library if ~/.cache/ldm-nodes/compiled has none);
each quiet, then beside a competitor: a second Python process running `a @ a` on 1024^2 fp32 matrices
in a loop with torch's default threads and wait policy (a plain torch job). Prints milliseconds per
step (best of --repeats) and busy / quiet. The machine's other load is printed with each figure (the
load average): "quiet" is only as quiet as the machine is.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
COMPETITOR = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
MAIN = "import sys\nfrom ldm_nodes.cli import main\nsys.exit(main(sys.argv[1:]))"


def seconds(start, steps, out, env, workflow="txt2img"):
    command = [*start, "run", f"workflows/api/{workflow}.json", "--out", out, "--quiet", "--set", f"4.steps={steps}"]
    begin = time.perf_counter()
    subprocess.run(command, cwd=PACK, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - begin


def step_ms(start, env, workflow, steps, repeats, out):
    long = min(seconds(start, steps + 1, out, env, workflow) for _ in range(repeats))
    short = min(seconds(start, 1, out, env, workflow) for _ in range(repeats))
    return (long - short) / steps * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", choices=["pack", "before", "passive", "active", "compiled"],
                        default=["pack", "before"],
                        help="which starts to time (before is slow on a busy machine)")
    args = parser.parse_args()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    cli = [sys.executable, "-m", "ldm_nodes"]
    ways = {"pack": (cli, clean, "txt2img"),
            "before": ([sys.executable, "-c", MAIN], dict(clean, OMP_NUM_THREADS=str(os.cpu_count())), "txt2img"),
            "passive": (cli, dict(clean, OMP_WAIT_POLICY="PASSIVE"), "txt2img"),
            "active": (cli, dict(clean, OMP_WAIT_POLICY="ACTIVE"), "txt2img"),
            "compiled": (cli, clean, "txt2img_compiled")}
    ways = {name: ways[name] for name in args.ways}
    out = tempfile.mkdtemp(prefix="ldm_busy_")
    results = {}
    for name, (start, env, workflow) in ways.items():
        seconds(start, 1, out, env, workflow)  # a compiled run's first start builds its package (a minute, once)
        for state in ("quiet", "busy"):
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=clean) if state == "busy" else None
            try:
                if competitor:
                    time.sleep(3)  # past its import
                load = os.getloadavg()[0]
                results[name, state] = step_ms(start, env, workflow, args.steps, args.repeats, out)
                print(f"{name:6s} {state:5s} {results[name, state]:7.1f} ms per step   (load average {load:.1f})",
                      flush=True)
            finally:
                if competitor:
                    competitor.kill()
                    competitor.wait()
    for name in ways:
        print(f"{name:6s} busy / quiet: {results[name, 'busy'] / results[name, 'quiet']:.1f}x")


if __name__ == "__main__":
    main()
