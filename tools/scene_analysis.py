"""Read a 64x64 scene image back into its caption's words by plain image analysis (no learned model).

`analyse(image)` is how the built-in model's samples are scored: generate from a caption of
core/data.py's grammar, analyse the image, compare the words. It mirrors the geometry core/data.py
defines (its module docstring) and is tolerant of the blur and noise of a small diffusion model:

1. background: the per-channel median of the 2-pixel border ring, named by the nearest COLOR_RGB.
2. shape color: the median of the pixels more than FAR from the background color, keeping the
   half farthest from it; named by the nearest COLOR_RGB.
3. shape region: each pixel's coverage is its position on the segment from the background color to
   the shape color; the region is the largest 4-connected blob of pixels covered more than half
   (specks elsewhere are ignored), grown by GROW pixels to take in the blurred edge. Steps 2 and 3
   pick pixels on a 3x3 median-filtered copy of the image, so that noise does not pass for shape.
   Everything below integrates the coverage of the unfiltered pixels over that region, unclipped
   (so noise averages out); blur conserves it.
4. shape: from the rotation-invariant complex moments c_n = sum coverage * (z - centroid)^n,
   z = x + iy: |c3| / A^2.5 is TRIANGLE_C3 for an equilateral triangle and 0 for squares and circles
   (3-fold symmetry), |c4| / A^3 is SQUARE_C4 for a square at any angle and 0 for circles and
   triangles (4-fold symmetry). The class is the nearest of triangle (1, 0), square (0, 1) and
   circle (0, 0) in these two features scaled by those constants.
5. size: the span (bounding box side, as core/data.py defines it) from the area A and the class:
   circle 2 sqrt(A / pi), triangle sqrt(4 A / sqrt 3), square sqrt(A) (|cos a| + |sin a|) with the
   square's angle a = (arg c4 - pi) / 4; then the nearest of the span ranges SIZE_SPANS.
6. position: the bounding box center (the centroid; for an apex-up triangle span sqrt(3) / 12 above
   it) as an offset from the canvas center, nearest of the regions POSITION_BOXES.

Every decision is "nearest prototype or region", with margin 1 - d_nearest / d_second (1: squarely
in, 0: on the fence); `confidence` is the smallest margin of the five. The color and span tables
are core/data.py's own.
"""
import math

import numpy as np
from PIL import Image, ImageFilter

from ..core.data import COLOR_RGB, RESOLUTION, SIZE_SPANS

# |c3| / A^2.5 of an equilateral triangle: c3 = A R^3 / 10 (R: centroid-to-vertex), A = 3 sqrt(3) R^2 / 4.
TRIANGLE_C3 = (4 / (3 * math.sqrt(3))) ** 1.5 / 10
SQUARE_C4 = 1 / 60  # |c4| / A^3 of a square: (16 / 15) h^6 / (2 h)^6 for half-side h
SHAPE_FEATURES = {"triangle": (1.0, 0.0), "square": (0.0, 1.0), "circle": (0.0, 0.0)}  # (|c3|, |c4|) scaled

# (x_min, x_max, y_min, y_max) of the bounding box center's offset from the canvas center, per
# position: core/data.py keeps a centered shape within JITTER = 3 px and puts the others 1..3 px from
# an edge, which with spans of 12..36 px (triangles are 0.87 span tall) is 11..26 px off center.
POSITION_BOXES = {
    "on the left": (-26, -11, -3, 3),
    "on the right": (11, 26, -3, 3),
    "at the top": (-3, 3, -26, -11),
    "at the bottom": (-3, 3, 11, 26),
    "in the center": (-3, 3, -3, 3),
}
BORDER = 2  # width of the ring the background is read from
FAR = 40.0  # RGB distance from the background beyond which a pixel counts as shape (colors are >= 97 apart)
MIN_PIXELS = 12  # fewer shape pixels than this: no shape found
GROW = 3  # pixels the shape region is grown by (a slight blur's edge lies within)


def analyse(image):
    """Read a scene back: {"color", "background", "shape", "position", "size", "confidence"}.

    image: a 64x64 RGB PIL image or a uint8 array [64, 64, 3]. When no shape is found the four
    shape fields are None and confidence is 0.0; the background is always read.
    """
    pixels = _pixels(image)
    background_rgb = _border_median(pixels)
    background, background_margin = _nearest(_color_distances(background_rgb))
    result = {"background": background, "color": None, "shape": None, "position": None, "size": None,
              "confidence": 0.0}
    coverage, shape_rgb = _shape_coverage(pixels, background_rgb)
    if coverage is None:
        return result
    result["color"], color_margin = _nearest(_color_distances(shape_rgb))
    area, center, c3, c4 = _moments(coverage)
    features = np.array([abs(c3) / area ** 2.5 / TRIANGLE_C3, abs(c4) / area ** 3 / SQUARE_C4])
    result["shape"], shape_margin = _nearest({name: float(np.linalg.norm(features - prototype))
                                              for name, prototype in SHAPE_FEATURES.items()})
    span = _span(result["shape"], area, (np.angle(c4) - math.pi) / 4)
    result["size"], size_margin = _nearest({name: _interval_distance(span, *limits)
                                            for name, limits in SIZE_SPANS.items()})
    if result["shape"] == "triangle":
        center = center - (0.0, span * math.sqrt(3) / 12)
    offset = center - RESOLUTION / 2
    result["position"], position_margin = _nearest({name: _box_distance(offset, box)
                                                    for name, box in POSITION_BOXES.items()})
    result["confidence"] = min(background_margin, color_margin, shape_margin, size_margin, position_margin)
    return result


def _pixels(image):
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.shape != (RESOLUTION, RESOLUTION, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"expected a {RESOLUTION}x{RESOLUTION} RGB image or uint8 array, "
                         f"got shape {pixels.shape} dtype {pixels.dtype}")
    return pixels.astype(np.float64)


def _border_median(pixels):
    ring = np.ones(pixels.shape[:2], bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    return np.median(pixels[ring], axis=0)


def _shape_coverage(pixels, background_rgb):
    """(coverage map, zero outside the shape region; shape color), or (None, None) if no shape.

    Which pixels belong to the shape is decided on a 3x3 median-filtered copy, so pixel noise
    neither passes for shape nor breaks the blob up; the coverage itself is read from the pixels.
    """
    smooth = np.asarray(Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.MedianFilter(3)), float)
    distance = np.linalg.norm(smooth - background_rgb, axis=-1)
    far = distance > FAR
    if far.sum() < MIN_PIXELS:
        return None, None
    core = far & (distance >= np.median(distance[far]))
    shape_rgb = np.median(pixels[core], axis=0)
    direction = shape_rgb - background_rgb
    blob = _largest_component(_coverage(smooth, background_rgb, direction) > 0.5)
    if blob.sum() < MIN_PIXELS:
        return None, None
    return _coverage(pixels, background_rgb, direction) * _grow(blob, GROW), shape_rgb


def _coverage(pixels, background_rgb, direction):
    """Each pixel's position on the segment from the background color (0) to the shape color (1)."""
    return (pixels - background_rgb) @ direction / (direction @ direction)


def _largest_component(mask):
    """The largest 4-connected component of a boolean mask (labels spread by repeated max-pooling)."""
    if not mask.any():
        return mask
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = labels.copy()
        spread[1:] = np.maximum(spread[1:], labels[:-1])
        spread[:-1] = np.maximum(spread[:-1], labels[1:])
        spread[:, 1:] = np.maximum(spread[:, 1:], labels[:, :-1])
        spread[:, :-1] = np.maximum(spread[:, :-1], labels[:, 1:])
        spread *= mask
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _grow(mask, steps):
    """The mask dilated `steps` times by the 4-neighbourhood."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _moments(coverage):
    """(area, centroid (x, y), c3, c4): complex moments about the centroid.

    Pixel [row i, column j] stands for the point (j + 0.5, i + 0.5).
    """
    ys, xs = np.mgrid[:RESOLUTION, :RESOLUTION] + 0.5
    area = coverage.sum()
    center = np.array([(coverage * xs).sum(), (coverage * ys).sum()]) / area
    z = (xs - center[0]) + 1j * (ys - center[1])
    return area, center, (coverage * z ** 3).sum(), (coverage * z ** 4).sum()


def _span(shape, area, angle):
    """The bounding box side of a shape of this class and area (see the module docstring)."""
    if shape == "circle":
        return 2 * math.sqrt(area / math.pi)
    if shape == "triangle":
        return math.sqrt(4 * area / math.sqrt(3))
    return math.sqrt(area) * (abs(math.cos(angle)) + abs(math.sin(angle)))


def _color_distances(rgb):
    return {name: float(np.linalg.norm(rgb - np.asarray(value))) for name, value in COLOR_RGB.items()}


def _interval_distance(value, low, high):
    return max(low - value, 0.0, value - high)


def _box_distance(point, box):
    x_min, x_max, y_min, y_max = box
    return math.hypot(_interval_distance(point[0], x_min, x_max), _interval_distance(point[1], y_min, y_max))


def _nearest(distances):
    """(the name at the smallest distance, margin 1 - smallest / second smallest)."""
    ranked = sorted(distances, key=distances.get)
    nearest, second = distances[ranked[0]], distances[ranked[1]]
    return ranked[0], 1.0 - nearest / second
