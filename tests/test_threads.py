"""core/threads.py: the command line's thread policy, and that nothing else gets it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_nodes.core import threads
from ldm_nodes.core.progress import TextProgress

PACK = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, expected", [
    (["python3", "-m", "ldm_nodes", "run", "x.json"], True),
    (["python3", "-X", "importtime", "-m", "ldm_nodes", "nll", "a.png"], True),
    (["python3", "-m", "ldm_nodes.__main__", "train"], True),
    (["python3", "-m", "pytest", "tests"], False),
    (["python3", "main.py", "--listen"], False),  # ComfyUI
    (["python3", "-c", "import ldm_nodes"], False),
    (["python3", "script.py", "-m", "ldm_nodes"], False),  # the script's own argument
    (["python3", "-c", "pass", "-m", "ldm_nodes"], False),
    (["python3", "-mldm_nodes", "run"], True),
])
def test_only_the_packs_own_command_line_counts_as_the_cli(argv, expected):
    assert threads.started_as_cli(argv) is expected


def test_the_spin_count_is_set_only_for_the_cli_before_torch_and_never_over_the_users(monkeypatch):
    cli = ["python3", "-m", "ldm_nodes", "run"]
    monkeypatch.delitem(sys.modules, "torch")  # as at the top of the package's __init__ under `python -m`
    env = {}
    assert threads.short_spin_for_cli(environ=env, argv=cli) and env == {"GOMP_SPINCOUNT": "10000"}
    assert threads.wait_policy(env) == "spin 10000 turns, then sleep"
    for users in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(users)
        assert not threads.short_spin_for_cli(environ=env, argv=cli) and env == users
    assert threads.wait_policy({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "5"}) == "PASSIVE"
    env = {}
    assert not threads.short_spin_for_cli(environ=env, argv=["python3", "main.py"]) and env == {}
    monkeypatch.setitem(sys.modules, "torch", torch)  # a host that loaded torch first: too late, and not ours
    assert not threads.short_spin_for_cli(environ=env, argv=cli) and env == {}


@pytest.mark.parametrize("default, cpus, busy, expected", [
    (2, 2, 0, 2), (2, 2, 1, 1), (2, 2, 7, 1), (8, 16, 4, 8), (16, 16, 4, 12), (4, 4, None, 4)])
def test_threads_are_the_cpus_other_work_leaves_free(default, cpus, busy, expected):
    assert threads.thread_count(default, cpus, busy) == expected


def test_busy_cpus_reads_a_count():
    busy = threads.busy_cpus()
    assert busy is None or busy >= 0


def test_configure_keeps_the_users_thread_count_and_says_so_once_at_the_first_progress_line(monkeypatch, capsys):
    monkeypatch.setattr(threads, "_chosen", None)
    before = torch.get_num_threads()
    env = {"OMP_NUM_THREADS": str(before), "OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.configure(environ=env) == (before, "PASSIVE")
    assert capsys.readouterr().err == ""  # a refusal before any work stays one line
    bar = TextProgress("x")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar.update(1, 2)
    bar.update(2, 2)
    assert capsys.readouterr().err.splitlines() == [
        f"torch threads: {before} (OMP_NUM_THREADS), OpenMP wait policy PASSIVE", "[x] 1/2", "[x] 2/2"]
    threads.configure(environ=env)
    TextProgress("y").update(1, 1)
    assert capsys.readouterr().err == "[y] 1/1\n" and torch.get_num_threads() == before


def test_nothing_is_announced_after_the_command(monkeypatch, capsys):
    monkeypatch.setattr(threads, "_chosen", None)
    threads.configure(environ={"OMP_NUM_THREADS": "1"})
    threads.command_done()
    threads.announce()
    assert capsys.readouterr().err == ""


def test_configure_sets_the_free_cpus(monkeypatch):
    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 1)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.configure(environ={}) == (1, "active (OpenMP's default)")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        threads.command_done()


def test_python_m_ldm_nodes_spins_briefly_says_so_before_progress_and_refuses_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "ldm_nodes", "nll"]
    done = subprocess.run([*command, str(tmp_path / "missing.png")], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    done = subprocess.run([*command, str(PACK / "input" / "shapes_32.png"), "--steps", "2"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[1] == "torch threads: 1 (OMP_NUM_THREADS), OpenMP wait policy spin 10000 turns, then sleep", lines
    assert lines[2].startswith("[nll ")


def test_importing_the_pack_changes_no_process_setting():
    """What a host sees: importing the pack (as ComfyUI does) sets no OpenMP variable and keeps torch's threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    code = ("import os, torch; n = torch.get_num_threads(); import ldm_nodes; "
            "print(n == torch.get_num_threads(), [k for k in os.environ if k.startswith(('OMP_', 'GOMP_'))])")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True []"


class FakeGC:
    """Stands in for the gc module, so the tests do not turn this process's collector off."""

    def __init__(self, enabled=True):
        self.enabled, self.calls = enabled, []

    def isenabled(self):
        return self.enabled

    def disable(self):
        self.enabled = False
        self.calls.append("disable")

    def enable(self):
        self.enabled = True
        self.calls.append("enable")

    def freeze(self):
        self.calls.append("freeze")


def test_collection_pauses_only_for_the_cli_before_torch_and_resumes_frozen(monkeypatch):
    from ldm_nodes.core import gc_pause
    cli = ["python3", "-m", "ldm_nodes", "run"]
    fake = FakeGC()
    monkeypatch.setattr(gc_pause, "gc", fake)
    monkeypatch.setattr(gc_pause, "_paused", False)
    gc_pause.resume()  # nothing paused: nothing to do (tests call the CLI's main in-process)
    assert fake.calls == []
    assert not gc_pause.pause_for_cli(argv=["python3", "main.py"]) and fake.calls == []  # a host
    monkeypatch.setitem(sys.modules, "torch", torch)
    assert not gc_pause.pause_for_cli(argv=cli) and fake.calls == []  # torch already loaded: not ours
    monkeypatch.delitem(sys.modules, "torch")  # as at the top of the package's __init__ under `python -m`
    assert gc_pause.pause_for_cli(argv=cli) and fake.calls == ["disable"]
    monkeypatch.setitem(sys.modules, "torch", torch)
    gc_pause.resume()
    gc_pause.resume()
    assert fake.calls == ["disable", "freeze", "enable"] and fake.enabled


def test_the_command_line_process_collects_again_once_its_command_runs():
    """In a fresh interpreter that is the command line (as `python -m ldm_nodes` starts it): importing the
    pack pauses collection, and the CLI's main() freezes the imports and collects again before the command."""
    code = (f"import sys; sys.orig_argv = [sys.executable, '-m', 'ldm_nodes', 'nll']; import gc, ldm_nodes; "
            f"paused = not gc.isenabled(); from ldm_nodes.cli import main; "
            f"status = main(['nll', {str(PACK / 'input' / 'shapes_32.png')!r}, '--steps', '2', '--quiet']); "
            f"print(paused, gc.isenabled(), gc.get_freeze_count() > 100000, status)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines()[-1].split() == ["True", "True", "True", "0"], done.stdout + done.stderr
