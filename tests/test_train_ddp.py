"""`train` under torchrun: 2 gloo processes on the CPU, stopped after one denoiser step and resumed,
train the same model as 1 process running uninterrupted with the same global batch, and only rank 0
writes files."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from ldm_nodes.cli import main
from ldm_nodes.core import train_loop

# Stage 1 and the denoiser, both with --flip (so the per-rank slices of every draw are exercised):
# a global batch of 4 images, as 4 in one process or 2 in each of two.
ARGS = ["--images", "12", "--resolution", "32", "--vae-steps", "2", "--save-every", "1", "--val", "2",
        "--workers", "0", "--flip"]

# Runs the command line with every file write of the process logged to WRITES.<rank>.
LAUNCHER = textwrap.dedent("""
    import builtins, os, sys
    import safetensors.torch

    log = open(os.environ["WRITES"] + "." + os.environ["RANK"], "a")

    def record(path):
        log.write(os.path.abspath(os.fspath(path)) + "\\n")
        log.flush()

    _open, _replace, _save_file = builtins.open, os.replace, safetensors.torch.save_file

    def logged_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            record(file)
        return _open(file, mode, *args, **kwargs)

    def logged_replace(src, dst, **kwargs):
        record(dst)
        return _replace(src, dst, **kwargs)

    def logged_save_file(tensors, filename, *args, **kwargs):
        record(filename)
        return _save_file(tensors, filename, *args, **kwargs)

    builtins.open, os.replace, safetensors.torch.save_file = logged_open, logged_replace, logged_save_file
    from ldm_nodes.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def tensors(path, prefix=""):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def assert_near(got, want, start, what):
    """Equal up to the rounding of a sum split over two processes, measured against what the run changed.
    The weights and the EMA are compared with their update (want - start, `start` the weights the stage
    began from): two warmup steps move the weights by a few millionths of their size, so a bound on the
    weights themselves would pass a run on other data; another batch or other noise changes the update
    by about its whole size. Adam's first steps, lr * g / |g|, turn the rounding of near-zero gradients
    into whole steps, hence the looser bound on the weights. Adam's moments are sums of gradients: other
    data would change them by their whole size, rounding by a millionth. Each kind is compared as one
    vector, so tensors whose gradients are all rounding noise do not decide alone."""
    assert got.keys() == want.keys(), what
    for kind, tolerance in (("model.", 1e-2), ("ema.", 1e-2), ("exp_avg", 1e-3), ("exp_avg_sq", 1e-3)):
        keys = [k for k in want if k.endswith(kind) or k.startswith(kind)]
        diff = torch.cat([(got[k].double() - want[k].double()).ravel() for k in keys]).norm()
        if kind in ("model.", "ema."):
            size = torch.cat([(want[k].double() - start[k.split(".", 1)[1]].double()).ravel() for k in keys]).norm()
        else:
            size = torch.cat([want[k].double().ravel() for k in keys]).norm()
        assert keys and size > 0 and diff <= tolerance * size, \
            f"{what} {kind}: |difference| {diff:.3g}, |{'update' if kind in ('model.', 'ema.') else 'tensors'}| {size:.3g}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_two_gloo_processes_stopped_and_resumed_train_what_one_process_trains_with_the_same_global_batch(
        tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    starts = []  # the weights each stage of the one-process run starts from, as the EMA first copies them

    class RecordingEMA(train_loop.EMA):
        def __init__(self, module, decay):
            super().__init__(module, decay)
            starts.append({k: v.clone() for k, v in self.shadow.items()})

    monkeypatch.setattr(train_loop, "EMA", RecordingEMA)
    assert main(["train", "--out", str(one), "--batch-size", "4", "--vae-batch-size", "4", *ARGS,
                 "--steps", "2"]) == 0

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "WRITES": str(tmp_path / "writes"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    outputs = []
    for steps in ("1", "2"):  # the first run stops after one denoiser step; the second resumes its state
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
             "train", "--out", str(two), "--batch-size", "2", "--vae-batch-size", "2", *ARGS, "--steps", steps],
            env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout.split())
    assert "denoiser: resuming at step 1" in result.stderr, result.stderr[-3000:]

    # The same weights and the same Adam moments in both stages.
    assert len(starts) == 2  # the autoencoder stage, then the denoiser stage
    for state, start in zip(("autoencoder-state.safetensors", "denoiser-state.safetensors"), starts):
        want, got = tensors(one / state), tensors(two / state)
        assert torch.equal(want.pop("rng"), got.pop("rng"))  # every rank drew the same numbers as one process
        assert_near(got, want, start, state)
    record = json.loads((two / "record.json").read_text())
    assert record["world_size"] == 2 and record["batch_size"] == 2 and record["global_batch_size"] == 4
    assert len(record["curves"]["held_out_bound"]) == 2  # evaluated once per save, by rank 0 alone

    # Only rank 0 wrote into the run folder, and it printed the one model path.
    written = {rank: (tmp_path / f"writes.{rank}").read_text().split() for rank in (0, 1)}
    assert not [p for p in written[1] if p.startswith(str(two))], written[1]
    assert str(two / "model.safetensors") in written[0]
    assert outputs == [[str(two / "model.safetensors")]] * 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
