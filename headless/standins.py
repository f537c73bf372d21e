"""Stand-ins for the ComfyUI core nodes a headless run needs, with ComfyUI's input names and semantics.

SaveImage writes <out>/<filename_prefix>_00001_.png, ... (numbering continues after the files
already there; %width%, %year%, ... filled in as ComfyUI does, save_names.py) and refuses a prefix that
leaves <out>; PreviewImage writes the same way to
<out>/temp/ComfyUI_temp_00001_.png, ... (ComfyUI's temp folder; delete it freely). LoadImage reads
names inside the input folder only. The folders are those of the run in progress (session.py's
`session()`), which the runner sets with `using(Session(...))`.
The mask nodes (SetLatentNoiseMask, ImageToMask, InvertMask, ImageCompositeMasked) are ComfyUI's
(nodes.py, comfy_extras/nodes_mask.py at 0.3.64), with the same inputs and results.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..core.errors import InputError
from ..core.files import file_in_the_way, written_whole
from ..core.images import read_image
from ..core.inpaint import composite
from .save_names import fill_image
from .session import session


def _check(function, *args):
    """VALIDATE_INPUTS' verdict on function(*args): True, or the message of its ValueError.

    The last argument is the input checked; None (a linked input) is left to run time."""
    if args[-1] is None:
        return True
    try:
        function(*args)
    except ValueError as error:
        return str(error)
    return True


MAX_PREFIX_BYTES = 200  # each part of the prefix, so "<part>_00001_.png" stays within a file system's 255
MAX_PREFIX_LENGTH = 1024


def _save_target(root, filename_prefix):
    """(folder, file name prefix, subfolder) for a SaveImage prefix; ValueError if it leaves `root`,
    holds a NUL byte, or has a part too long for a file name."""
    if "\0" in filename_prefix:
        raise ValueError("filename_prefix: holds a NUL byte")
    if len(filename_prefix) > MAX_PREFIX_LENGTH:
        raise ValueError(f"filename_prefix: {len(filename_prefix)} characters; at most {MAX_PREFIX_LENGTH}")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_PREFIX_BYTES for part in re.split(r"[\\/]", filename_prefix)):
        raise ValueError(f"filename_prefix: a folder or file name in it is longer than {MAX_PREFIX_BYTES} bytes")
    relative = os.path.normpath(filename_prefix)
    subfolder, name = os.path.split(relative)
    root = Path(root).resolve()
    folder = (root / subfolder).resolve()
    if not folder.is_relative_to(root) or name in ("", ".", ".."):
        raise ValueError(f"filename_prefix: {filename_prefix!r} must name files inside the output folder {root}")
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise ValueError(f"filename_prefix: {filename_prefix!r} needs the folder {blocking}, which is a file")
    return folder, name, subfolder.replace(os.sep, "/")


def _next_counter(folder, name):
    pattern = re.compile(re.escape(os.path.normcase(name)) + r"_(\d+)_")
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(os.path.normcase(f)))]
    return max(numbers, default=0) + 1


def _png_info(prompt, extra_pnginfo):
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def _save_pngs(images, root, filename_prefix, kind, compress_level, prompt, extra_pnginfo):
    folder, name, subfolder = _save_target(root, filename_prefix)
    folder.mkdir(parents=True, exist_ok=True)
    counter, info = _next_counter(folder, name), _png_info(prompt, extra_pnginfo)
    results = []
    for index, image in enumerate(images):
        pixels = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
        file = f"{name}_{counter + index:05}_.png"
        _write_png(Image.fromarray(pixels), folder / file, info, compress_level)
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
    return {"ui": {"images": results}}


def _write_png(image, path, info, compress_level):
    """Write under a temporary name, then rename: a full disk leaves no truncated PNG behind (InputError
    naming the file)."""
    with written_whole(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info, compress_level=compress_level)


class SaveImage:
    """ComfyUI's SaveImage: numbered PNGs in the output folder, with the workflow embedded."""
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        return _check(_save_target, session().out_dir, filename_prefix)

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        filename_prefix = fill_image(filename_prefix, images.shape[2], images.shape[1])  # %width%, %year%, ...
        return _save_pngs(images, session().out_dir, filename_prefix, "output", 4, prompt, extra_pnginfo)


class PreviewImage:
    """ComfyUI's PreviewImage: headless, numbered PNGs in <out>/temp (ComfyUI_temp_00001_.png, ...)."""
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        return _save_pngs(images, session().temp_dir, "ComfyUI_temp", "temp", 1, prompt, extra_pnginfo)


def _input_file(name):
    if "\0" in name:
        raise ValueError("image: the name holds a NUL byte")
    root = session().input_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image: {name!r} resolves outside the input folder {root}")
    if not path.is_file():
        raise ValueError(f"image: no file {name!r} in the input folder {root}")
    return path


class LoadImage:
    """ComfyUI's LoadImage: IMAGE [1,H,W,3] and MASK [1,H,W] = 1 - alpha (zeros 64x64 without alpha)."""
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        folder = session().input_dir
        files = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _check(_input_file, image)

    def load_image(self, image):
        rgb, alpha = read_image(_input_file(image), name="image")
        mask = 1 - alpha if alpha is not None else np.zeros((64, 64), dtype=np.float32)
        return torch.from_numpy(rgb)[None], torch.from_numpy(mask)[None]


MAX_RESOLUTION = 16384  # nodes.MAX_RESOLUTION


class SetLatentNoiseMask:
    """ComfyUI's SetLatentNoiseMask: the LATENT with noise_mask = mask as [B, 1, H, W] (LDMSample repaints it)."""
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)


class ImageToMask:
    """ComfyUI's ImageToMask: one channel of an IMAGE as a MASK [B, H, W]."""
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"
    CHANNELS = ["red", "green", "blue", "alpha"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channel": (cls.CHANNELS,)}}

    def image_to_mask(self, image, channel):
        index = self.CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise InputError("channel", f"the image has {image.shape[-1]} channels, so no {channel} channel")
        return (image[:, :, :, index],)


class InvertMask:
    """ComfyUI's InvertMask: 1 - mask."""
    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    def invert(self, mask):
        return (1.0 - mask,)


class ImageCompositeMasked:
    """ComfyUI's ImageCompositeMasked: source pasted onto destination at (x, y) through the mask
    (core/inpaint.composite): mask * source + (1 - mask) * destination."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "composite"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        position = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"destination": ("IMAGE",), "source": ("IMAGE",), "x": ("INT", position),
                             "y": ("INT", position), "resize_source": ("BOOLEAN", {"default": False})},
                "optional": {"mask": ("MASK",)}}

    def composite(self, destination, source, x, y, resize_source, mask=None):
        return (composite(destination, source, x, y, mask, resize_source),)


STAND_INS = {"SaveImage": SaveImage, "PreviewImage": PreviewImage, "LoadImage": LoadImage,
             "SetLatentNoiseMask": SetLatentNoiseMask, "ImageToMask": ImageToMask, "InvertMask": InvertMask,
             "ImageCompositeMasked": ImageCompositeMasked}
