"""What the hardening of issue #16 costs a normal run, and how soon a refusal comes.

    python bench/validation.py

Prints, in milliseconds (median of repeats, this process, one thread):
  - runner.validate of the shipped txt2img workflow (the graph checks every run pays);
  - memory.check_fits for encode, sample and decode at 64 x 64 (three per img2img run);
  - read_header of each built-in model (the header validator with its layout check: paid once per
    load, and by GET /ldm/schedule) and of a synthetic SD1.5 header when shared/sd15_keys.txt exists;
  - the finite pass over the weights at the first load of tiny-shapes (load time with and without it);
  - in-process refusals: a header with num_timesteps 1e9, a 10,000 x 10,000 PNG header, 200k-deep
    JSON, a 4096 x 4096 batch-16 sampling request;
  - the same refusals end to end through `python -m ldm_nodes` (wall time, including Python's and
    torch's start-up, which no check can avoid).
"""
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from ldm_nodes.headless import runner
from ldm_nodes.core import checkpoint as ck
from ldm_nodes.core import memory
from ldm_nodes.core.images import read_image

PACK = Path(__file__).resolve().parents[1]


def ms(function, repeats=20):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def refused_ms(function):
    start = time.perf_counter()
    try:
        function()
    except ValueError:
        return 1000 * (time.perf_counter() - start)
    raise AssertionError("not refused")


def png_header(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
    return path


def main():
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    prompt = runner.load_workflow(PACK / "workflows" / "api" / "txt2img.json")
    print(f"validate txt2img: {ms(lambda: runner.validate(prompt, out_dir=folder / 'out')):.2f} ms")
    loaded = ck.load_checkpoint(PACK / "models" / "tiny-shapes.safetensors")
    checks = (lambda: memory.check_fits("encode", loaded.vae, (1, 64, 64, 3)),
              lambda: memory.check_fits("sample", loaded.denoiser, (1, 4, 16, 16), 4),
              lambda: memory.check_fits("decode", loaded.vae, (1, 4, 16, 16)))
    print(f"check_fits encode + sample + decode, 64 x 64: {sum(ms(c) for c in checks):.2f} ms")
    for name in ("tiny-shapes", "tiny-shapes-transformer", "tiny-shapes-pixel"):
        print(f"read_header {name}: {ms(lambda: ck.read_header(PACK / 'models' / f'{name}.safetensors'), 5):.1f} ms")
    keys = PACK / "tests" / "data" / "sd15_keys.txt"
    if keys.exists():
        entries, end = {}, 0
        for line in keys.read_text().splitlines():
            key, shape = line.split("\t")
            size = 2 * int(torch.tensor(json.loads(shape)).prod()) if json.loads(shape) else 2
            entries[key] = {"dtype": "F16", "shape": json.loads(shape), "data_offsets": [end, end + size]}
            end += size
        raw = json.dumps(entries).encode()
        with open(folder / "sd15.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + end)
        print(f"read_header synthetic SD1.5 ({len(entries)} tensors): "
              f"{ms(lambda: ck.read_header(folder / 'sd15.safetensors'), 3):.0f} ms")
    path = PACK / "models" / "tiny-shapes.safetensors"
    ck._finite_parts.clear()
    first = ms(lambda: (ck._finite_parts.clear(), ck.load_checkpoint(path)), 5)
    again = ms(lambda: ck.load_checkpoint(path), 5)
    print(f"load tiny-shapes: {first:.0f} ms with the finite pass, {again:.0f} ms when remembered")

    metadata = ck.read_header(PACK / "models" / "tiny-shapes-pixel.safetensors").metadata
    from safetensors.torch import load_file, save_file
    metadata["schedule"] = {**metadata["schedule"], "num_timesteps": 10**9}
    save_file(load_file(PACK / "models" / "tiny-shapes-pixel.safetensors"), folder / "big_t.safetensors",
              metadata={ck.METADATA_KEY: json.dumps(metadata)})
    png_header(folder / "huge.png", 10_000, 10_000)
    (folder / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    print(f"refused in-process: num_timesteps 1e9 {refused_ms(lambda: ck.read_header(folder / 'big_t.safetensors')):.1f} ms, "
          f"10,000 x 10,000 PNG {refused_ms(lambda: read_image(folder / 'huge.png')):.1f} ms, "
          f"200k-deep JSON {1000 * _time(lambda: _refuse_json(folder / 'deep.json')):.1f} ms, "
          f"4096 x 4096 x 16 sampling "
          f"{refused_ms(lambda: memory.check_fits('sample', loaded.denoiser, (16, 4, 1024, 1024), 4)):.2f} ms")

    (folder / "wf.json").write_text(json.dumps(prompt))
    for label, args in (("nll, num_timesteps 1e9", ["nll", PACK / "input" / "shapes_32.png", "--model", "big_t.safetensors",
                                                    "--models-dir", folder]),
                        ("nll, 10,000 x 10,000 PNG", ["nll", folder / "huge.png"]),
                        ("run, 200k-deep JSON", ["run", folder / "deep.json", "--out", folder / "out"]),
                        ("run, 4096 x 4096 x 16", ["run", folder / "wf.json", "--out", folder / "out", "--set",
                                                   "5.width=4096", "--set", "5.height=4096", "--set", "5.batch_size=16"]),
                        ("python -c 'import torch' alone", None)):
        command = [sys.executable, "-m", "ldm_nodes", *map(str, args)] if args else [sys.executable, "-c", "import torch"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        print(f"end to end, {label}: {time.perf_counter() - start:.2f} s (exit {done.returncode})")


def _time(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _refuse_json(path):
    try:
        runner.read_json(path)
    except runner.WorkflowError:
        return
    raise AssertionError("not refused")


if __name__ == "__main__":
    main()
