"""Memory of loading a full-size SD1.5 checkpoint: no second full copy of the weights.

    python bench/memory_sd15.py [--dir DIR] [--file-dtype fp16|fp32] [--load-dtype fp16|fp32]

Writes a synthetic single-file checkpoint with every SD1.5 key and shape (tests/data/sd15_keys.txt,
random values: memory does not depend on them) into DIR, then loads it with core/checkpoint.py in a
fresh process while sampling the process's anonymous resident memory (RssAnon: what the loaded
modules and any temporary copies occupy; the file's own pages are file-backed and not counted).
The target: at most 3 GB of anonymous memory beyond the weights' memory map, i.e. the fp16 weights
(2.13 GB) plus working space, never a second full fp32 copy (4.27 GB).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1024**3
KEYS = Path(__file__).resolve().parents[1] / "tests" / "data" / "sd15_keys.txt"


def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def write_checkpoint(path, dtype_name, keys_file):
    import torch
    from safetensors.torch import save_file

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for line in Path(keys_file).read_text().splitlines():
        key, shape = line.split("\t")
        tensors[key] = (torch.randn(json.loads(shape), generator=g) * 0.02).to(dtype)
    save_file(tensors, path)


def measure(path, dtype_name):
    """Runs in the child process: peak RssAnon while loading, in bytes, above the start."""
    import torch

    from ldm_nodes.core.checkpoint import load_checkpoint

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    base, peak, done = rss_anon(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)

    thread = threading.Thread(target=poll)
    thread.start()
    start = time.perf_counter()
    ck = load_checkpoint(path, dtype=dtype)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    weights = sum(p.numel() * p.element_size() for m in (ck.denoiser, ck.vae, ck.text_encoder) for p in m.parameters())
    print(json.dumps({"peak_anon_gb": (max(peak[0], rss_anon()) - base) / GB, "weights_gb": weights / GB,
                      "seconds": seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the synthetic file (default: a temporary folder)")
    parser.add_argument("--file-dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--load-dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--keys", default=str(KEYS), help="SD1.5 key list (tests/data/sd15_keys.txt)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.load_dtype)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, f"sd15-synthetic-{args.file_dtype}.safetensors")
        write_checkpoint(path, args.file_dtype, args.keys)
        print(f"synthetic SD1.5 file: {os.path.getsize(path) / GB:.2f} GB ({args.file_dtype})")
        out = subprocess.run([sys.executable, __file__, "--measure", path, "--load-dtype", args.load_dtype],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    extra = result["peak_anon_gb"] - result["weights_gb"]
    print(f"load as {args.load_dtype}: weights {result['weights_gb']:.2f} GB, peak anonymous memory "
          f"{result['peak_anon_gb']:.2f} GB ({extra:+.2f} GB beyond the weights), {result['seconds']:.1f} s")
    if args.load_dtype == "fp16":
        print("ok: within 3 GB" if result["peak_anon_gb"] <= 3.0 else "FAIL: more than 3 GB beyond the file's map")


if __name__ == "__main__":
    main()
