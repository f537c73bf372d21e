"""Training data as torch Datasets: the procedural scenes in memory, or a folder of the user's images.

Every dataset yields (uint8 image [3, R, R], index) and carries its `captions` (one string per image,
"" when it has none), so the trainer handles both the same way and a torch DataLoader can decode a
folder's images lazily in worker processes: memory does not grow with the number of images.

A folder holds png, jpg and webp files of any size and mode, read through the pack's one image
reader (core/images.py); a transparent picture (RGBA, LA, a palette or colour key marked transparent)
is laid over a background colour (white unless chosen), so what hides under its transparent pixels
never reaches the model. Captions come, in this order, from a same-name .txt beside the image or
from a metadata.jsonl of {"file_name": ..., "text": ...} lines (the Hugging Face imagefolder
convention); an image with neither trains on the empty prompt. Each image is resized so its short
side is R (antialiased bilinear) and center-cropped to R x R. Unreadable or truncated files, pictures
more than MAX_ASPECT times longer than wide (or wider than long: their resized long side would be
unbounded; checked from the header, before decoding) and links that lead nowhere or loop are skipped,
with their count and first names reported; a folder with no usable image is refused. A caption that
is not one line of at most 75 tokens is refused before any training, naming its file.
"""
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .images import composite, open_image, read_image
from .stops import ignore_stop_signals
from .text import CLIPTokenizer, tokenize_weighted

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"
WHITE = (1.0, 1.0, 1.0)
MAX_ASPECT = 8  # the most a picture's long side may exceed its short side
PROGRESS_EVERY = 100  # images decoded between progress reports of a scan
MAX_CAPTION_BYTES = 16384  # far above 75 tokens: a caption file past it is not a caption


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
    """Image files decoded on demand, laid over `background` (r, g, b in [0, 1]) where transparent,
    resized on the short side and center-cropped to `resolution`."""

    def __init__(self, files, captions, resolution, describe, background=WHITE):
        self.files, self.captions, self.resolution, self.describe = list(files), list(captions), resolution, describe
        self.background = background

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rgb = composite(*read_image(self.files[i]), self.background)
        return square_crop(torch.from_numpy(rgb).permute(2, 0, 1), self.resolution), i

    def subset(self, indices):
        return FolderImages([self.files[i] for i in indices], [self.captions[i] for i in indices], self.resolution,
                            self.describe, self.background)


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


def image_files(folder):
    """(the image files of `folder`, sorted; [(name, why)] of image names that are links leading nowhere or
    looping); InputError when it is not a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError("--data", f"{folder}: no such folder")
    files, dangling = [], []
    for path in sorted(root.iterdir()):
        if path.suffix.lower() not in EXTENSIONS:
            continue
        if path.is_file():
            files.append(path)
        elif path.is_symlink():
            try:
                path.resolve(strict=True)
                why = "a link to something that is not a file"
            except RuntimeError:  # Python < 3.13 reports a loop so
                why = "a symbolic link loop"
            except OSError as error:
                why = "a symbolic link loop" if error.errno == errno.ELOOP else "a link to nothing"
            dangling.append((path.name, why))
    return files, dangling


def scan_folder(folder, resolution, workers=0, background=WHITE, progress=None):
    """The usable images of `folder` with their captions, over `background` where transparent. Every
    caption is checked first (InputError naming its file), then each image is decoded once (in `workers`
    DataLoader processes), so a truncated file is found before training rather than mid-run.
    progress(done, total): called every PROGRESS_EVERY images decoded."""
    root = Path(folder)
    files, unreadable = image_files(folder)
    if not files:
        raise InputError("--data", f"{folder}: no png, jpg or webp images in it"
                                   + (f" ({unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""))
    from_jsonl = _jsonl_captions(root)
    tokenizer = CLIPTokenizer()
    captions, missing = [], []
    for path in files:
        text = path.with_suffix(".txt")
        if text.is_file():
            captions.append(_check_caption(tokenizer, _read_caption(text), text))
        else:
            captions.append(_check_caption(tokenizer, from_jsonl.get(path.name, ""), f"{root / METADATA} ({path.name})"))
        missing.append(not text.is_file() and path.name not in from_jsonl)
    describe = {"data": os.fspath(root.resolve()), "files": len(files), "background": list(background)}
    probe = FolderImages(files, captions, resolution, describe, background)
    usable = []
    loader = torch.utils.data.DataLoader(_Probe(probe), batch_size=None, num_workers=workers,
                                         worker_init_fn=ignore_stop_signals)
    for done, (i, problem) in enumerate(loader, 1):
        if problem is None:
            usable.append(i)
        else:
            unreadable.append((files[i].name, problem))
        if progress and done % PROGRESS_EVERY == 0:
            progress(done, len(files))
    if not usable:
        first = "; ".join(f"{name}: {why}" for name, why in unreadable[:3])
        raise InputError("--data", f"{folder}: none of its {len(files)} images can be read ({first})")
    return FolderScan(probe.subset(usable), unreadable, sum(missing[i] for i in usable))


def _read_caption(path):
    """The text of a caption file, refused by name past MAX_CAPTION_BYTES without reading it all."""
    with open(path, "rb") as f:
        data = f.read(MAX_CAPTION_BYTES + 1)
    if len(data) > MAX_CAPTION_BYTES:
        raise InputError(path, f"over {MAX_CAPTION_BYTES:,} bytes: a caption is one line of at most 75 tokens")
    return data.decode("utf-8", errors="replace").strip()


def _check_caption(tokenizer, text, source):
    """`text`, or InputError naming `source` when it does not fit in one 77-token chunk."""
    if len(text) > MAX_CAPTION_BYTES or len(tokenize_weighted(tokenizer, text)[0]) != 1:
        raise InputError(source, f"the caption is longer than 75 tokens ({text[:40]!r}...); shorten it")
    return text


class _Probe(torch.utils.data.Dataset):
    """(index, None) for an image of a FolderImages that decodes and can be cropped square, (index, the
    reason) for one that cannot. Only what passes here is trained on, so training reads each file once."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            _check_aspect(self.dataset.files[i])
            self.dataset[i]
        except InputError as error:
            return i, error.reason
        return i, None


def _check_aspect(path):
    """Refuse, from the header before decoding, a picture too narrow to crop a square from: resized on its
    short side, its long side would be unbounded."""
    with open_image(path) as image:
        width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(path, f"{width} x {height} pixels: more than {MAX_ASPECT} times longer one way than the "
                               "other, too narrow to crop a square from")


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
