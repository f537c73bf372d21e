"""Training data as torch Datasets: the procedural scenes in memory, or a folder of the user's images.

Every dataset yields (uint8 image [3, R, R], index) and carries its `captions` (one string per image,
"" when it has none), so the trainer handles both the same way and a torch DataLoader can decode a
folder's images lazily in worker processes: memory does not grow with the number of images.

A folder holds png, jpg and webp files of any size and mode, read through the pack's one image
reader (core/images.py). Captions come, in this order, from a same-name .txt beside the image or
from a metadata.jsonl of {"file_name": ..., "text": ...} lines (the Hugging Face imagefolder
convention); an image with neither trains on the empty prompt. Each image is resized so its short
side is R (antialiased bilinear) and center-cropped to R x R. Unreadable or truncated files are
skipped, with their count and first names reported; a folder with no usable image is refused.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .images import read_image

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"


class TensorImages(torch.utils.data.Dataset):
    """Images already in memory: uint8 [N, 3, R, R] and their captions (the procedural scenes)."""

    def __init__(self, images, captions, describe):
        self.images, self.captions, self.describe = images, list(captions), describe
        self.resolution = images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i

    def subset(self, indices):
        return TensorImages(self.images[indices], [self.captions[i] for i in indices], self.describe)


class FolderImages(torch.utils.data.Dataset):
    """Image files decoded on demand, resized on the short side and center-cropped to `resolution`."""

    def __init__(self, files, captions, resolution, describe):
        self.files, self.captions, self.resolution, self.describe = list(files), list(captions), resolution, describe

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rgb, _ = read_image(self.files[i])  # alpha is dropped, as PIL's convert("RGB") and imagefolder do
        return square_crop(torch.from_numpy(rgb).permute(2, 0, 1), self.resolution), i

    def subset(self, indices):
        return FolderImages([self.files[i] for i in indices], [self.captions[i] for i in indices], self.resolution,
                            self.describe)


def square_crop(image, size):
    """float [3, H, W] in [0, 1] -> uint8 [3, size, size]: the short side resized to `size`, then the center."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    image = image[:, top:top + size, left:left + size]
    return image.mul(255).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class FolderScan:
    """What scan_folder found: the usable dataset, and what it had to leave out."""

    dataset: FolderImages
    unreadable: list  # (file name, reason)
    uncaptioned: int  # usable images with neither a .txt nor a metadata.jsonl line


def scan_folder(folder, resolution, workers=0):
    """The usable images of `folder` with their captions. Each file is decoded once here (in `workers`
    DataLoader processes), so a truncated file is found before training rather than mid-run."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError("--data", f"{folder}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise InputError("--data", f"{folder}: no png, jpg or webp images in it")
    from_jsonl = _jsonl_captions(root)
    captions, missing = [], []
    for path in files:
        text = path.with_suffix(".txt")
        if text.is_file():
            captions.append(text.read_text(encoding="utf-8", errors="replace").strip())
        else:
            captions.append(from_jsonl.get(path.name, ""))
        missing.append(not text.is_file() and path.name not in from_jsonl)
    describe = {"data": os.fspath(root.resolve()), "files": len(files)}
    probe = FolderImages(files, captions, resolution, describe)
    usable, unreadable = [], []
    loader = torch.utils.data.DataLoader(_Probe(probe), batch_size=None, num_workers=workers)
    for i, problem in loader:
        if problem is None:
            usable.append(i)
        else:
            unreadable.append((files[i].name, problem))
    if not usable:
        first = "; ".join(f"{name}: {why}" for name, why in unreadable[:3])
        raise InputError("--data", f"{folder}: none of its {len(files)} images can be read ({first})")
    return FolderScan(probe.subset(usable), unreadable, sum(missing[i] for i in usable))


class _Probe(torch.utils.data.Dataset):
    """(index, None) for an image that decodes, (index, the reason) for one that does not."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            self.dataset[i]
        except InputError as error:
            return i, error.reason
        return i, None


def _jsonl_captions(root):
    """{file name: text} from root/metadata.jsonl, or {} without one; a malformed line is refused by number."""
    path = root / METADATA
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[Path(row["file_name"]).name] = str(row.get("text", ""))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}", f"line {number} is not a JSON object with a \"file_name\"") from None
    return captions


def split_held_out(dataset, count, seed):
    """(training set, held-out set of `count` images), a fixed split drawn from `seed`; count 0 or a
    dataset of one image leaves nothing held out (None)."""
    if count == 0 or len(dataset) < 2:
        return dataset, None
    count = min(count, len(dataset) // 2)  # never more held out than trained on
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(dataset))
    return dataset.subset(sorted(order[count:].tolist())), dataset.subset(sorted(order[:count].tolist()))


def materialise(dataset):
    """uint8 [N, 3, R, R] of a small dataset (the held-out images)."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])
