"""Torch's CPU threads for the pack's own commands (`python -m ldm_nodes run / nll / train`), never a host's.

OpenMP threads that wait at a barrier spin (libgomp's default: 300,000 turns before sleeping), so when
another process keeps a core busy, the thread that lost its core holds up its partners while they burn
the CPU that would let it finish: on the 2-core machine a UNet call took 20x its quiet time next to
another busy process (bench/RESULTS.md). Two settings fix that, each left alone when the user has set it:

- how long a waiting thread spins: GOMP_SPINCOUNT=10000 turns (microseconds), then it sleeps. OpenMP
  reads it once, when torch loads it, so it has to be in the environment before torch is imported: the
  package's __init__ calls `short_spin_for_cli` first thing, which sets it only when this interpreter
  was started as `python -m ldm_nodes` (a process the pack owns; ComfyUI and other hosts import torch
  long before the pack, and their settings are theirs). Not OMP_WAIT_POLICY=PASSIVE (no spin at all),
  which an earlier version set: on an idle machine waking the sleeping threads at each of a UNet call's
  ~600 parallel regions cost 2x a sampling step (bench/RESULTS.md), where the short spin keeps the
  idle speed and the busy machine's too. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept;
- the number of threads: one per CPU that other work leaves free at the start (the runnable tasks of
  /proc/stat, else the load average), at least 1, at most torch's default. `configure` sets it; the
  CLI's main() calls it once, nodes never do. The choice is said once on stderr, before the first
  progress line (none with --quiet, and none before a refusal, which stays one line).

Inside ComfyUI the pack changes neither: README.md says what to set there (GOMP_SPINCOUNT=10000, and
OMP_NUM_THREADS on a shared machine) before starting ComfyUI.

This module imports torch only inside `configure`, so the package can import it before torch.
"""
import os
import statistics
import sys
import time

PACKAGE = "ldm_nodes"
_chosen = None  # what configure() chose, once per process
_pending = None  # its one line for stderr, until announced or the command ends


def started_as_cli(argv=None, package=PACKAGE):
    """Whether the interpreter was started as `python [options] -m <package> ...` (its __main__)."""
    args = iter((sys.orig_argv if argv is None else argv)[1:])
    for arg in args:  # the interpreter's options, up to the first that names what it runs
        if arg in ("-X", "-W"):
            next(args, None)
        elif arg.startswith("-m"):
            return (arg[2:] or next(args, None)) in (package, f"{package}.__main__")
        elif arg.startswith("-c") or not arg.startswith("-") or arg == "-":
            return False
    return False


SPIN = "10000"  # GOMP_SPINCOUNT: turns a waiting OpenMP thread spins before it sleeps


def cli_before_torch(package=PACKAGE, argv=None):
    """Whether this process is the pack's command line and torch is not loaded yet: when the pack may set
    what the process starts with (a host's process, whose torch came first, is never touched)."""
    return "torch" not in sys.modules and started_as_cli(argv, package)


def short_spin_for_cli(package=PACKAGE, environ=os.environ, argv=None):
    """GOMP_SPINCOUNT=SPIN in the environment when this process is the pack's command line, torch is not
    loaded yet and the user has chosen no wait policy nor spin count. Returns whether it was set."""
    if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(environ) or not cli_before_torch(package, argv):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN
    return True


def wait_policy(environ=os.environ):
    """How waiting OpenMP threads behave, as the environment says (for the announcement)."""
    if "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"]
    if "GOMP_SPINCOUNT" in environ:
        return f"spin {environ['GOMP_SPINCOUNT']} turns, then sleep"
    return "active (OpenMP's default)"


def busy_cpus(samples=5, interval=0.002):
    """How many CPUs other processes keep busy now: the median of a few readings of the runnable tasks
    (/proc/stat's procs_running, less this process), else the 1-minute load average; None if unknown."""
    try:
        readings = []
        for i in range(samples):
            if i:
                time.sleep(interval)
            with open("/proc/stat") as stat:
                readings.append(next(int(line.split()[1]) for line in stat if line.startswith("procs_running")))
        return max(0, round(statistics.median(readings)) - 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return round(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def thread_count(default, cpus, busy):
    """Threads for this process: the CPUs that other work leaves free, within 1..default."""
    if busy is None:
        return default
    return max(1, min(default, cpus - busy))


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure(environ=os.environ):
    """Choose torch's threads for this command-line process, once. A thread count the user set
    (OMP_NUM_THREADS, which torch has read already) is kept. What was chosen is said on stderr by
    `announce`, just before the command's first progress line, so a refused input stays one line.
    Returns (threads, wait policy)."""
    global _chosen, _pending
    if _chosen is not None:
        return _chosen
    import torch

    policy = wait_policy(environ)
    if "OMP_NUM_THREADS" in environ:
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        cpus, busy = usable_cpus(), busy_cpus()
        threads = thread_count(torch.get_num_threads(), cpus, busy)
        torch.set_num_threads(threads)
        why = f"{cpus} CPUs, {busy if busy is not None else 'unknown'} busy with other work"
    _chosen = threads, policy
    _pending = f"torch threads: {threads} ({why}), OpenMP wait policy {policy}"
    return _chosen


def announce():
    """Say on stderr what `configure` chose, the first time this is called during the command (core/progress
    calls it before its first line); nothing outside a command."""
    global _pending
    if _pending is not None:
        print(_pending, file=sys.stderr, flush=True)
        _pending = None


def command_done():
    """The command is over: nothing left to announce (the CLI's main() runs more than one command in tests)."""
    global _pending
    _pending = None
