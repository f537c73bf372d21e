"""Stopping and sharing a run folder: Ctrl-C or SIGTERM saves the state at the step reached and says how
to resume (exit 130, no traceback, no temporary file), and a second trainer on the same --out is refused."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ldm_nodes
from ldm_nodes.cli import main
from ldm_nodes.core import stops, train, train_loop
from ldm_nodes.core.datasets import TensorImages
from ldm_nodes.core.run_lock import LOCK_NAME, hold
from ldm_nodes.core.unet import UNetConfig, UNetModel
from ldm_nodes.core.text import CLIPTextConfig

ARGS = ["--images", "16", "--resolution", "32", "--vae-steps", "1", "--batch-size", "2", "--vae-batch-size", "2",
        "--workers", "0", "--val", "0", "--save-every", "100000"]


def trainer(out, steps):
    """`python -m ldm_nodes train` in a child process (its own interpreter, as a user runs it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(ldm_nodes.__file__).parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "ldm_nodes", "train", "--out", str(out), "--steps", str(steps), *ARGS],
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(process, pattern, timeout=240):
    """Read the child's stderr until a line matches `pattern`; returns what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    process.kill()
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_reached_and_the_same_command_resumes_there(tmp_path, sig):
    out = tmp_path / "out"
    process = trainer(out, 100000)
    wait_for(process, r"\[denoiser\] 20/")
    assert (out / LOCK_NAME).read_text().strip() == str(process.pid)
    process.send_signal(sig)
    err = process.stderr.read()
    assert process.wait(60) == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > 0
    last = err.strip().splitlines()[-1]
    step = int(re.search(r"denoiser stage is saved at step (\d+) of 100000", last).group(1))
    assert step >= 20 and "resume with:" in last and "--out" in last
    assert not list(out.glob("*.tmp*")) and not (out / LOCK_NAME).exists()
    process = trainer(out, step + 1)  # the same run, given one more step
    err = process.stderr.read()
    assert process.wait(120) == 0, err
    assert f"denoiser: resuming at step {step} from" in err and "Traceback" not in err


def test_a_signal_during_a_save_finishes_the_save_then_stops(tmp_path, monkeypatch):
    """The signal lands while the state is written: the file is completed and renamed, nothing .tmp is left,
    and the stage stops at that step."""
    writing = train_loop.save_state

    def save_state_while_signalled(path, *args):
        os.kill(os.getpid(), signal.SIGINT)
        writing(path, *args)

    monkeypatch.setattr(train_loop, "save_state", save_state_while_signalled)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    opts = train_loop.RunOptions(str(tmp_path), 10, batch_size=2, lr=1e-3, warmup=1, save_every=3, log_every=100)
    unet = UNetModel(UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16))
    text = train.CLIPTextModel(CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64))
    with pytest.raises(stops.Interrupted) as stop:
        train.train_denoiser(opts, train.IdentityAutoencoder(), unet, text,
                             TensorImages(images, [""] * 8, {"data": "test"}), train.PIXEL_SCHEDULE)
    assert stop.value.step == 3
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []
    assert train_loop.state_metadata(tmp_path / "denoiser-state.safetensors")["step"] == "3"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_a_second_trainer_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    process = trainer(out, 100000)
    try:
        wait_for(process, r"\[denoiser\] 20/")
        capsys.readouterr()
        assert main(["train", "--out", str(out), "--steps", "5", *ARGS]) == 1
        err = capsys.readouterr().err
        assert err.strip() == (f"error: --out: {out}: another trainer (pid {process.pid}) is running on this folder; "
                               f"wait for it to finish or stop it (if no trainer runs, delete {out / LOCK_NAME})")
    finally:
        process.kill()
        process.wait()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(gone.stdout)
    with hold(tmp_path) as path:
        assert Path(path).read_text().strip() == str(os.getpid())
    assert "taking over a stale lock" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()
