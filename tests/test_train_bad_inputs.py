"""`train` refuses a user's mistakes before any work: one line naming the input, a non-zero exit, no
traceback, and nothing written."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_nodes.cli import main
from ldm_nodes.core import datasets, memory, train, train_loop, train_stages

FAST = ["--images", "8", "--resolution", "32", "--vae-steps", "1", "--steps", "1", "--batch-size", "2",
        "--vae-batch-size", "2", "--workers", "0", "--val", "0"]


def refused(capsys, argv, name):
    """Run `train argv`; assert it failed with one line naming `name`, and return that line."""
    capsys.readouterr()
    assert main(["train", *argv]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), err
    assert "Traceback" not in err
    return lines[0]


def picture(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("flag, value", [
    ("--steps", "-5"), ("--steps", "0"), ("--batch-size", "0"), ("--vae-batch-size", "-1"), ("--images", "0"),
    ("--save-every", "0"), ("--vae-steps", "0"), ("--decoder-steps", "-1"), ("--val", "-1"), ("--workers", "-2"),
    ("--seed", "-1"), ("--data-seed", "-3"), ("--resolution", "16"), ("--resolution", "1024"),
    ("--lr", "nan"), ("--lr", "0"), ("--lr", "-0.0001"), ("--vae-lr", "inf"),
])
def test_numbers_out_of_range_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    line = refused(capsys, ["--out", str(out), f"{flag}={value}"], flag)
    assert value in line
    assert not out.exists()


@pytest.mark.parametrize("value", ["abc", "1e3"])
def test_a_flag_that_is_not_a_number_is_one_line_naming_it(tmp_path, capsys, value):
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--steps", value], "--steps")
    assert f"{value} is not an integer" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_denoiser_family_is_refused_before_any_work(tmp_path, capsys):
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--denoiser", "mamba", *FAST], "--denoiser")
    assert "unet, transformer" in line  # the families core/families.py registers
    assert not (tmp_path / "out").exists()


def test_a_billion_scenes_are_refused_with_the_memory_they_would_need(tmp_path, capsys):
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--images", "1000000000"], "--images")
    assert "1,000,000,000 scenes need about 11,6" in line and "GiB" in line  # 12 kB each
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--vae-batch-size"])
def test_a_batch_whose_forward_pass_alone_cannot_fit_is_refused_before_any_work(tmp_path, capsys, monkeypatch, flag):
    """The tiny model's forward pass at 65536 x 64 x 64 is estimated at over 100 GiB; with 8 GiB available
    (patched, so the test does not depend on this machine) the flag is refused before anything is written."""
    monkeypatch.setattr(memory, "available_memory", lambda device: (8 * 2**30, "test"))
    out = tmp_path / "out"
    line = refused(capsys, ["--out", str(out), "--images", "8", flag, "65536"], flag)
    assert "65536 at 64 x 64: one forward pass alone needs about" in line and "8.00 GiB is available" in line
    assert not out.exists()
    monkeypatch.setattr(memory, "available_memory", lambda device: (None, "no memory figure"))
    assert train.check_batches_fit(train.Recipe(str(out), batch_size=65536), 64,
                                   train.prepare(train.Recipe(str(out)), 64)) is None  # no figure: no refusal


def test_running_out_of_memory_or_diverging_mid_run_is_one_line_naming_the_cause(tmp_path, capsys, monkeypatch):
    """Past the estimate, a failed allocation during a step names the stage's batch-size flag, and a loss
    that becomes NaN names the stage and --lr: one line each, no traceback."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)")

    def last_line(out):  # the autoencoder stage ran first and reported its progress
        capsys.readouterr()
        assert main(["train", "--out", str(tmp_path / out), *FAST]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    monkeypatch.setattr(train_stages, "l_simple", out_of_memory)
    assert last_line("a").startswith("error: --batch-size: 2 ran out of memory at step 1 of the denoiser stage")
    monkeypatch.setattr(train_stages, "l_simple", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    assert last_line("b") == "error: denoiser: the loss became nan at step 1; lower --lr"


def test_out_that_is_a_file_or_lies_under_one(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    refused(capsys, ["--out", str(tmp_path / "file")], "--out")
    refused(capsys, ["--out", str(tmp_path / "file" / "run")], "--out")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "tpu"])
def test_devices_that_are_not_there(tmp_path, capsys, device):
    refused(capsys, ["--out", str(tmp_path / "out"), "--device", device], "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    refused(capsys, ["--out", str(tmp_path / "out"), "--device", "cuda"], "--device")


def test_resolution_the_model_cannot_divide_and_the_scenes_cannot_give(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        picture(data / f"{i}.png", seed=i)
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(data), "--resolution", "40"], "--resolution")
    assert "multiple of 16" in line
    refused(capsys, ["--out", str(tmp_path / "out"), "--resolution", "48"], "--resolution")  # scenes: 32 or 64
    assert not (tmp_path / "out").exists()


def test_folders_with_nothing_to_learn(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert "no png, jpg or webp" in refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(empty)], "--data")
    refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(tmp_path / "missing")], "--data")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (broken / "b.jpg").write_bytes(b"not a jpeg")
    picture(broken / "c.png")
    (broken / "c.png").write_bytes((broken / "c.png").read_bytes()[:200])  # truncated
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(broken)], "--data")
    assert "none of its 3 images" in line and "a.png" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [os.urandom(3000), b"", "truncated", "no metadata"])
def test_a_state_that_is_not_one_is_refused_by_name(tmp_path, capsys, content):
    out = tmp_path / "out"
    out.mkdir()
    state = out / "autoencoder-state.safetensors"
    if content == "truncated" or content == "no metadata":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1000)}, state, metadata=None if content == "no metadata" else {"step": "1"})
        if content == "truncated":
            state.write_bytes(state.read_bytes()[:-100])
    else:
        state.write_bytes(content)
    before = state.read_bytes()
    refused(capsys, ["--out", str(out), *FAST], str(state))
    assert sorted(p.name for p in out.iterdir()) == [state.name] and state.read_bytes() == before


def test_a_corrupt_finished_autoencoder_is_refused_by_name(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "autoencoder.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{\"a\": 1}       junk")
    refused(capsys, ["--out", str(out), *FAST], str(out / "autoencoder.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == ["autoencoder.safetensors"]


def test_a_malformed_init_header_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{garbage")
    refused(capsys, ["--out", str(tmp_path / "out"), "--init", str(bad)], "--init")
    bad.write_bytes(b"\x02\0\0\0\0\0\0\0[]")
    refused(capsys, ["--out", str(tmp_path / "out"), "--init", str(bad)], "--init")
    assert not (tmp_path / "out").exists()


def test_options_that_do_not_go_together(tmp_path, capsys):
    refused(capsys, ["--out", str(tmp_path / "out"), "--pixel", "--cache-latents"], "--cache-latents")
    refused(capsys, ["--out", str(tmp_path / "out"), "--precision", "bf16"], "--precision")
    refused(capsys, ["--out", str(tmp_path / "out"), "--train-text-encoder", *FAST], "--train-text-encoder")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_one_image_trains_without_a_held_out_split(tmp_path, capsys):
    data = tmp_path / "one"
    data.mkdir()
    picture(data / "only.webp", size=(50, 37))
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--data", str(data), *FAST[2:-1], "8"]) == 0
    err = capsys.readouterr().err
    assert "one image, so no held-out split" in err and "1 of 1 images have no caption" in err
    record = json.loads((out / "record.json").read_text())
    assert record["images"] == 1 and record["held_out"] == 0 and record["uncaptioned_images"] == 1
    assert "held_out_bound" not in record["curves"]


def test_a_two_million_pixel_strip_is_skipped_by_name_before_it_is_decoded(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (2_000_000, 1), "red").save(data / "strip.png")  # 6 KB on disk, 24 GB once resized
    Image.new("RGB", (1, 100_000), "red").save(data / "column.png")
    picture(data / "fine.png")
    decoded, read_image = [], datasets.read_image

    def reading(path):
        decoded.append(Path(path).name)
        return read_image(path)

    monkeypatch.setattr(datasets, "read_image", reading)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "out"), "--data", str(data), "--dry-run", *FAST[2:]]) == 0
    err = capsys.readouterr().err
    assert "skipping 2 unusable image(s)" in err and "column.png (1 x 100000 pixels" in err and "strip.png" in err
    assert set(decoded) == {"fine.png"}  # the strips were refused from their headers
    (data / "fine.png").unlink()
    line = refused(capsys, ["--out", str(tmp_path / "out2"), "--data", str(data)], "--data")
    assert "none of its 2 images" in line and "times longer" in line


def test_held_out_counts_beyond_the_data_are_refused_before_any_work(tmp_path, capsys):
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--val", "100000"], "--val")
    assert "100,000 held-out scenes for 30,000" in line
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        picture(data / f"{i}.png", seed=i)
    assert "holds 3" in refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(data), "--val", "50"], "--val")
    assert not (tmp_path / "out").exists()


def test_the_memory_figure_is_the_tightest_of_ram_and_the_process_limits(tmp_path, monkeypatch):
    import resource

    ram, _ = memory.available_memory("cpu")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**30, resource.RLIM_INFINITY) if which ==
                        resource.RLIMIT_AS else (resource.RLIM_INFINITY,) * 2)
    available, source = memory.available_memory("cpu")
    assert available < 2**30 and "RLIMIT_AS" in source  # the address space in use counts against the limit
    monkeypatch.undo()
    limit, usage = tmp_path / "limit_in_bytes", tmp_path / "usage_in_bytes"
    limit.write_text(f"{3 * 2**30}\n")
    usage.write_text(f"{2**30}\n")
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (("/nonexistent/memory.max", "/nonexistent/memory.current"),
                                                  (str(limit), str(usage))))
    if ram > 2 * 2**30:
        assert memory.available_memory("cpu") == (2 * 2**30, "RAM (the container's memory limit)")
    limit.write_text(f"{2**63 - 4096}\n")  # cgroup v1's "no limit"
    assert memory.available_memory("cpu")[0] == ram or "MemAvailable" in memory.available_memory("cpu")[1]


def test_a_megabyte_caption_is_refused_by_its_file_before_any_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        picture(data / f"{i}.png", seed=i)
    (data / "0.txt").write_text("a cat " * 200_000)
    line = refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(data), *FAST[2:]], str(data / "0.txt"))
    assert "over 16,384 bytes" in line
    (data / "0.txt").write_text("a cat " * 100)  # small, but past 75 tokens
    assert "longer than 75 tokens" in refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(data)],
                                              str(data / "0.txt"))
    (data / "0.txt").unlink()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "1.png", "text": "dog " * 100}) + "\n")
    refused(capsys, ["--out", str(tmp_path / "out"), "--data", str(data)], f"{data / 'metadata.jsonl'} (1.png)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["/proc/x", "/sys/x/y"])
def test_an_out_folder_that_cannot_be_made_is_one_line(out, capsys):
    assert "cannot be created" in refused(capsys, ["--out", out, *FAST], "--out")


def test_a_full_disk_during_a_save_is_one_line_and_the_saved_state_stays(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "out"
    assert main(["train", "--out", str(out), *FAST, "--steps", "2", "--save-every", "1"]) == 0
    state = out / "denoiser-state.safetensors"
    before = state.read_bytes()
    writing = train_loop.save_file

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:  # a part of the file, then the disk is full
            f.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(train_loop, "save_file", full_disk)
    capsys.readouterr()
    assert main(["train", "--out", str(out), *FAST, "--steps", "3", "--save-every", "1"]) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress lines of the step that ran
    assert "Traceback" not in err and line.startswith(f"error: {state}: could not be written")
    assert "No space left on device" in line and "the copy saved before is intact" in line
    assert state.read_bytes() == before and not list(out.glob("*.tmp")) and not (out / "train.lock").exists()
    monkeypatch.setattr(train_loop, "save_file", writing)


def test_symbolic_link_loops_in_the_data_are_reported(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    picture(data / "real.png")
    os.symlink(data / "loop.png", data / "loop.png")
    os.symlink(data / "gone.png", data / "dangling.png")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "out"), "--data", str(data), "--dry-run", *FAST[2:]]) == 0
    err = capsys.readouterr().err
    assert "skipping 2 unusable image(s)" in err
    assert "loop.png (a symbolic link loop)" in err and "dangling.png (a link to nothing)" in err
