"""Data loading for `train --data`: samples/s and peak memory on N images (default 10,000 of 128 x 128).

Writes N random-stripe PNGs (with captions) into a temporary folder, then measures, each in a fresh
child process so peak memory is its own:
  scan     scan_folder: every file decoded once to find broken ones (the DataLoader's workers)
  load     one epoch of the trainer's DataLoader (decode, resize, crop, batch of 64), 0 and W workers
  cache    optional (--cache): the latents of the tiny autoencoder computed once into the .npy cache
and the memory the images would take held in memory as uint8, for comparison. Peak memory is the
child's maximum resident set (ru_maxrss), which includes torch itself (about 0.3-0.4 GB).

    python bench/data_loading.py [--images 10000] [--size 128] [--workers 2] [--cache]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_folder(root, n, size):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    from PIL import Image

    for i in range(n):
        f = rng.uniform(0.05, 0.5, 3)
        rgb = np.stack([np.sin(f[0] * x), np.sin(f[1] * y), np.sin(f[2] * (x + y))], -1) * 127.5 + 127.5
        Image.fromarray(rgb.astype(np.uint8)).save(os.path.join(root, f"{i:05d}.png"), compress_level=1)
        with open(os.path.join(root, f"{i:05d}.txt"), "w") as fh:
            fh.write(f"stripes {i % 17}")


def child(task, root, size, workers):
    """One measurement in this process; prints a JSON line."""
    import torch

    from ldm_nodes.core import train, train_stages
    from ldm_nodes.core.datasets import scan_folder

    torch.set_num_threads(1)
    start = time.perf_counter()
    scan = scan_folder(root, size, workers)
    result = {"task": task, "workers": workers, "images": len(scan.dataset), "scan_s": time.perf_counter() - start}
    opts = train.RunOptions(tempfile.mkdtemp(), 1, batch_size=64, workers=workers)
    if task == "load":
        start, seen = time.perf_counter(), 0
        loader = torch.utils.data.DataLoader(scan.dataset, batch_size=64, shuffle=True, num_workers=workers)
        for images, _ in loader:
            seen += len(images)
        result["samples_per_s"] = seen / (time.perf_counter() - start)
    elif task == "cache":
        vae = train.AutoencoderKL(train.TINY_AUTOENCODER).eval()
        start = time.perf_counter()
        train_stages.LatentCache.build(os.path.join(opts.out_dir, "latents.npy"), vae, scan.dataset, opts)
        result["cache_s"] = time.perf_counter() - start
        result["cache_samples_per_s"] = len(scan.dataset) / result["cache_s"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_worker_rss_mb"] = children / 1024
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", action="store_true", help="also build the latent cache (slow on a CPU)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, root, size, workers = args.child
        return child(task, root, int(size), int(workers))
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_folder(root, args.images, args.size)
        print(f"wrote {args.images} PNGs of {args.size} x {args.size} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        in_memory = args.images * 3 * args.size ** 2 / 2**20
        print(f"held in memory as uint8 they would take {in_memory:.0f} MB")
        runs = [("load", 0), ("load", args.workers)] + ([("cache", args.workers)] if args.cache else [])
        for task, workers in runs:
            out = subprocess.run([sys.executable, __file__, "--child", task, root, str(args.size), str(workers)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            line = f"{task:5s} workers={workers}: scan {r['images'] / r['scan_s']:.0f} images/s"
            if "samples_per_s" in r:
                line += f", one epoch {r['samples_per_s']:.0f} samples/s"
            if "cache_s" in r:
                line += f", latent cache {r['cache_samples_per_s']:.0f} images/s"
            print(line + f", peak RSS {r['peak_rss_mb']:.0f} MB (largest worker {r['peak_worker_rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
