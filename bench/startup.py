"""Time to the first image and to a full bound, as a new user meets them: fresh processes, measured
side by side with `python -c "import torch"` on the same machine, in the same run.

    python bench/startup.py [--repeats 5] [--threads N] [--skip-nll]

Each round runs, one after the other in fresh interpreters (the package as this interpreter imports
it, PYTHONPATH included):
  - import:  python -c "import torch"
  - run:     python -m ldm_nodes run workflows/api/txt2img.json --out TMP --quiet
  - nll:     python -m ldm_nodes nll input/shapes_32.png   (the built-in pixel model, all 1000 timesteps)
and prints, per command, the median wall time and the median CPU time (user + system, children
included), then run - import and nll - import: the cost above importing torch. The CPU times are the
steadier figures on a shared machine (wall time waits for other work). --threads N sets
OMP_NUM_THREADS for the children: on a machine busy with other work, torch's default threads spin
and wait for each other, so 1 thread gives the figures that say something about the code. Targets (issue #30; #21 had
1.5 s for the run): run within 0.4 s of the import, nll within 2 s of it, on the 2-core CPU.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent


def timed(command, env):
    """(wall seconds, CPU seconds of the child) of one run of `command`, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=PACK, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-nll", action="store_true", help="time the import and the run only")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the children (default: torch's own)")
    args = parser.parse_args()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    out = tempfile.mkdtemp(prefix="ldm_startup_")
    commands = {"import": [sys.executable, "-c", "import torch"],
                "run": [sys.executable, "-m", "ldm_nodes", "run", "workflows/api/txt2img.json", "--out", out,
                        "--quiet"]}
    if not args.skip_nll:
        commands["nll"] = [sys.executable, "-m", "ldm_nodes", "nll", "input/shapes_32.png"]
    times = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():  # interleaved, so load on the machine hits all alike
            times[name].append(timed(command, env))
    print(f"{os.cpu_count()} CPUs, {args.threads or 'default'} torch threads, {args.repeats} rounds; medians")
    medians = {}
    for name, pairs in times.items():
        medians[name] = tuple(statistics.median(p[i] for p in pairs) for i in (0, 1))
        print(f"{name:7s} wall {medians[name][0]:6.2f} s   cpu {medians[name][1]:6.2f} s")
    for name, target in (("run", 0.4), ("nll", 2.0)):  # issue #30's targets
        if name in medians:
            wall, cpu = (medians[name][i] - medians["import"][i] for i in (0, 1))
            print(f"{name} - import: wall {wall:.2f} s, cpu {cpu:.2f} s (target: within {target} s)")


if __name__ == "__main__":
    main()
