"""The pack's one image reader: LoadImage in the runner, `nll` and the trainer's folder data.

Every Pillow mode is read into float32 RGB in [0, 1] by its own bit depth (a 16-bit PNG is
divided by 65535, not clipped at 255), with the alpha channel when the file has one (RGBA, LA, PA,
or a palette or colour key marked transparent); `composite` lays such a picture over a background
colour, as the trainer sees it. The size is checked from the header, before any pixel is decoded, so
a huge or decompression-bomb file is refused cheaply and by name.
"""
import warnings

import numpy as np
from PIL import Image, ImageColor, ImageOps

from .errors import InputError

MAX_PIXELS = 8192 * 8192  # ComfyUI's largest latent (16384 / 8 squared) would be 4x this; 256 MB as float32 RGB

# Modes whose samples are integers above 8 bits, and the full-scale value each one is divided by.
_HIGH_BIT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def open_image(path, name=None, max_pixels=MAX_PIXELS):
    """The image in `path`, opened and checked but not decoded; InputError naming `name` (default the path)."""
    name = name or str(path)
    try:
        with warnings.catch_warnings():  # Pillow warns above its limit; the check below names the size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:  # twice Pillow's limit: refused by Pillow at open
        raise InputError(name, f"the image is too large to read ({error})") from None
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for unknown or broken files
        raise InputError(name, f"cannot read the image ({error})") from None
    width, height = image.size
    if width == 0 or height == 0:
        image.close()
        raise InputError(name, f"{width} x {height} pixels: the image is empty")
    if width * height > max_pixels:
        image.close()
        raise InputError(name, f"{width} x {height} pixels is over the limit of {max_pixels:,} pixels")
    return image


def read_image(path, name=None, max_pixels=MAX_PIXELS):
    """(rgb [H, W, 3], alpha [H, W] or None), float32 in [0, 1], upright by the file's EXIF orientation."""
    name = name or str(path)
    image = open_image(path, name, max_pixels)
    try:
        with image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if "transparency" in image.info and image.mode in ("P", "L", "RGB"):  # a palette or colour key marked
                image = image.convert("RGBA")  # transparent: read as RGBA, which spares Pillow's palette warning
            return _rgb(image), _alpha(image)
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixel data
        raise InputError(name, f"cannot decode the image ({error})") from None


def _rgb(image):
    if image.mode in _HIGH_BIT_MODES or image.mode == "I":
        grey = np.asarray(image, dtype=np.float64)
        full_scale = _HIGH_BIT_MODES.get(image.mode) or (65535 if grey.max(initial=0) <= 65535 else 2**31 - 1)
        return _grey_to_rgb(grey / full_scale)
    if image.mode == "F":
        return _grey_to_rgb(np.asarray(image, dtype=np.float64))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def _grey_to_rgb(grey):
    grey = np.clip(np.nan_to_num(grey, nan=0.0), 0, 1).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=-1)


def _alpha(image):
    if "A" in image.getbands():
        return np.asarray(image.getchannel("A"), dtype=np.float32) / 255
    if "transparency" in image.info:
        return np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float32) / 255
    return None


def check_image_file(path, resolution):
    """For a bound of the image (nll, classify): refuse from the file's header, before decoding it,
    transparency, or a size other than the model's training size (when its file says)."""
    with open_image(path) as image:
        if "A" in image.getbands() or "transparency" in image.info:
            raise ValueError(f"{path}: mode {image.mode} has transparency; the bound is defined for RGB images "
                             "(convert it to RGB without alpha first)")
        width, height = image.size
        if resolution and (width, height) != (resolution, resolution):
            raise ValueError(f"{path}: {width}x{height}, but this model was trained on {resolution}x{resolution} "
                             "images; resize it")


def background_color(text):
    """An (r, g, b) in [0, 1] from a colour name or #rrggbb (Pillow's ImageColor); ValueError otherwise."""
    return tuple(c / 255 for c in ImageColor.getrgb(text)[:3])


def composite(rgb, alpha, background):
    """rgb [H, W, 3] over a solid `background` (r, g, b) in [0, 1] by alpha [H, W] (None: opaque), so
    what hides under transparent pixels never shows: alpha * rgb + (1 - alpha) * background."""
    if alpha is None:
        return rgb
    a = alpha[..., None]
    return (a * rgb + (1 - a) * np.asarray(background, dtype=np.float32)).astype(np.float32)
