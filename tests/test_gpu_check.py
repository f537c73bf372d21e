"""bench/gpu_check.py, the script a lent GPU runs first: its dry run on tiny shapes on the CPU (so it cannot rot
between devices), and its package check, which must stop with the missing pin's name rather than drop rows."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_nodes.core.samplers import SAMPLERS

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


def bench_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_check():
    return bench_module("gpu_check")


def test_dry_run_on_the_cpu_writes_every_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--device", "cpu", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=170, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["packages", "CUDA tests", "CPU and device images, every sampler", "speed", "goals"]
    assert all(step["ok"] for step in steps.values())
    images = steps["CPU and device images, every sampler"]
    assert {row["mode"] for row in images["rows"]} == {"default", "tf32 off"} and images["worst_max_255"] == 0
    # every goal is read from its row and compared (in a dry run not counted); only peak memory is CUDA's
    goals = {g["goal"]: g for g in steps["goals"]["goals"]}
    assert len(goals) == 1 + len(gpu_check().GOALS)
    assert [name for name, g in goals.items() if g["figure"] is None] == \
        ["peak memory of the whole image, fp16 (allocated by torch)"]
    assert "skipped" in steps["CUDA tests"]["summary"] and "failed" not in steps["CUDA tests"]["summary"]
    assert {row["sampler"] for row in steps["CPU and device images, every sampler"]["rows"]} == set(SAMPLERS)
    whats = [row["what"] for row in steps["speed"]["rows"]]
    assert whats[:2] == ["UNet step, batch 2", "UNet step, batch 8"] and whats[-1].startswith("whole image")
    assert all(row["ours_fast"] > 0 and row["ours_fast_nhwc"] > 0 for row in steps["speed"]["rows"][:2])
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## speed: ok" in markdown and "| UNet step, batch 8 |" in markdown and "## goals: ok" in markdown


def fake_steps(module, monkeypatch, step_ms):
    """gpu_check's steps replaced by their results on a device that met every goal, but with the batch-2
    UNet step taking `step_ms`: main's own judging and exit status run on them."""
    speed_rows = [
        {"what": "UNet step, batch 2", "dtype": "fp16", "ours_fast": step_ms, "ours_fast_nhwc": step_ms + 1},
        {"what": "UNet step, batch 8", "dtype": "fp16", "ours_fast": 12.0, "ours_fast_nhwc": 13.0},
        {"what": "VAE decode, bf16", "dtype": "bf16", "ours": 7.0, "ours_nhwc": 9.0},
        {"what": "whole image, 30 CFG steps", "dtype": "fp16", "ours": 140.0, "ours_peak_allocated_gib": 2.5},
    ]
    monkeypatch.setattr(module, "packages", lambda *args: {"installed": {}})
    monkeypatch.setattr(module, "cuda_tests", lambda *args: {"ok": True})
    monkeypatch.setattr(module, "sampler_images", lambda *args: {"ok": True, "worst_max_255": 1.0})
    monkeypatch.setattr(module, "speed", lambda *args: {"rows": speed_rows})
    monkeypatch.setattr(module, "alias_package", lambda folder: None)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main puts bench/ first


@pytest.mark.parametrize("step_ms", [3.5, 4.5], ids=["met", "missed"])
def test_a_missed_goal_exits_non_zero_naming_it_with_its_figure(tmp_path, monkeypatch, capsys, step_ms):
    module = gpu_check()
    fake_steps(module, monkeypatch, step_ms)
    with pytest.raises(SystemExit) as exit:
        module.main(["--out", str(tmp_path), "--device", "cpu"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert exit.value.code == (0 if step_ms < 4 else 1)
    assert [g["met"] for g in report["steps"]["goals"]["goals"]] == [True, step_ms < 4, True, True, True, True]
    if step_ms > 4:
        assert "MISSED UNet CFG step, batch 2, fp16: 4.5 ms > 4 ms" in capsys.readouterr().err
        assert "MISSED UNet CFG step, batch 2, fp16: 4.5 ms" in (tmp_path / "gpu_check.md").read_text()
        with pytest.raises(SystemExit) as exit:  # --report-only: named, but not an error
            module.main(["--out", str(tmp_path), "--device", "cpu", "--report-only"])
        assert exit.value.code == 0


def test_a_goal_without_its_figure_is_missed_not_passed():
    goals = gpu_check().judge({"speed": {"rows": []}}, dry_run=False)
    assert not any(g["met"] for g in goals) and all(g["figure"] is None for g in goals)


def test_every_requirement_is_pinned_and_matches_the_test_extra():
    pins = gpu_check().read_pins()
    pyproject = (REPO / "pyproject.toml").read_text()
    for name in ("diffusers", "transformers"):
        assert f'"{name}=={pins[name]}"' in pyproject
    assert {"pytest", "safetensors", "numpy", "pillow", "einops"} <= set(pins) and "torch" not in pins
    lines = [line for line in (REPO / "bench" / "gpu_requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", line) for line in lines)


def test_a_pin_without_a_wheel_stops_with_its_name(tmp_path):
    module = gpu_check()
    (tmp_path / "pytest-0.0.1-py3-none-any.whl").write_bytes(b"")  # another version is no match
    with pytest.raises(module.MissingPackages, match=r"no_such_package==1\.0, pytest==0\.0\.2"):
        module.install({"no_such_package": "1.0", "pytest": "0.0.2"}, tmp_path, tmp_path / "site")
    satisfied = {"pytest": module.installed_version("pytest")}
    assert module.install(satisfied, tmp_path / "absent", tmp_path / "site") == {}  # nothing to install, no pip


def test_speed_leaves_out_only_what_is_not_installed():
    optional = bench_module("speed").optional
    assert optional("no_such_module_here", lambda: 1) is None

    def broken_wheel():
        raise ImportError("cannot import name 'CLIPTextModel'")

    with pytest.raises(ImportError, match="CLIPTextModel"):  # installed but broken: no silently missing rows
        optional("json", broken_wheel)
