"""The procedural captioned dataset the built-in text-to-image model is trained on.

Each sample is a 64x64 RGB scene: one solid shape on a plain background, drawn with Pillow, and the
caption that describes it. The caption grammar is a contract (the README's prompts rely on it):

    "a {size} {color} {shape} {position} on a {background} background"

with size in SIZES, color and background in COLORS (the background always differs from the color),
shape in SHAPES and position in POSITIONS. Every word keeps one exact geometric meaning:

- span: the side of the shape's axis-aligned bounding box, the larger side if they differ. A circle's
  span is its diameter; an equilateral triangle (always apex up) spans its side length, its height
  being span * sqrt(3) / 2; a square rotated by `angle` spans span = side * (|cos a| + |sin a|), so a
  rotated square has the same bounding box as an upright one of the same span, with a shorter side.
  "small" spans SIZE_SPANS["small"] = 12..20 px, "large" spans 26..36 px.
- center: the center of that bounding box, in pixels ((0, 0) is the top-left corner of the canvas;
  the pixel in column i, row j covers [i, i + 1) x [j, j + 1)). With (dx, dy) = center - (32, 32):
  "in the center": |dx| <= JITTER and |dy| <= JITTER;
  "on the left" / "on the right": the box lies EDGE_GAP = 1..3 px from that canvas edge, so
  |dx| >= 11 (dx < 0 on the left), and |dy| <= JITTER;
  "at the top" / "at the bottom": the same with the roles of x and y swapped (y grows downwards).
  Every shape therefore lies fully inside the canvas, at least 1 px from each edge.
- color: each color name has one RGB in COLOR_RGB; a scene varies each channel by at most
  COLOR_JITTER, which keeps every drawn color far nearer its own name than any other.

Scenes are drawn at SUPERSAMPLE x the resolution and box-downsampled, so edges are anti-aliased:
a pixel is background * (1 - c) + color * c, c being the fraction of the pixel the shape covers.

All randomness comes from the numpy Generator passed in (or built from a seed): never global state.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZES = ("small", "large")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
ATTRIBUTES = ("size", "color", "shape", "position", "background")

COLOR_RGB = {
    "red": (220, 30, 30),
    "orange": (240, 125, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOR_JITTER = 10  # max change of one channel of a drawn color, in 0..255 units

RESOLUTION = 64
SIZE_SPANS = {"small": (12.0, 20.0), "large": (26.0, 36.0)}
JITTER = 3.0  # max offset from the canvas center across the position's axis (both axes if centered)
EDGE_GAP = (1.0, 3.0)  # distance from the bounding box to the canvas edge a position points at
SQUARE_ROTATED_FRACTION = 0.5  # the other squares are drawn upright (angle 0)
SUPERSAMPLE = 4
CIRCLE_VERTICES = 96
EVAL_CAPTIONS = 40


@dataclass(frozen=True)
class Scene:
    """What a caption says (the five words) plus the geometry and colors actually drawn.

    center: (x, y) of the bounding box center in pixels; span: see the module docstring;
    angle: rotation in degrees, counter-clockwise on screen (nonzero only for squares);
    rgb, background_rgb: the drawn colors, within COLOR_JITTER of COLOR_RGB[color / background].
    """
    size: str
    color: str
    shape: str
    position: str
    background: str
    center: tuple
    span: float
    angle: float
    rgb: tuple
    background_rgb: tuple

    @property
    def words(self):
        """The caption's five attributes, as parse_caption returns them."""
        return {name: getattr(self, name) for name in ATTRIBUTES}


def caption(scene):
    """The scene's caption, in the contract grammar."""
    return (f"a {scene.size} {scene.color} {scene.shape} {scene.position} "
            f"on a {scene.background} background")


def parse_caption(text):
    """Read a caption back into {size, color, shape, position, background}.

    Case and runs of whitespace are ignored; anything else outside the grammar raises ValueError
    naming the offending word (or the missing one), as does a background equal to the color.
    """
    words = text.lower().split()
    template = ["a", SIZES, COLORS, SHAPES, POSITIONS, "on", "a", COLORS, "background"]
    names = {1: "size", 2: "color", 3: "shape", 4: "position", 7: "background"}
    found, i = {}, 0
    for slot, expected in enumerate(template):
        n_words = 3 if expected is POSITIONS else 1
        if i + n_words > len(words):
            raise ValueError(f"caption {text!r} ends early: expected {names.get(slot, repr(expected))}")
        word = " ".join(words[i:i + n_words])
        if isinstance(expected, str) and word != expected:
            raise ValueError(f"unexpected word {word!r} in caption {text!r}: expected {expected!r}")
        if isinstance(expected, tuple):
            if word not in expected:
                raise ValueError(f"unknown {names[slot]} {word!r} in caption {text!r}; "
                                 f"expected one of: {', '.join(expected)}")
            found[names[slot]] = word
        i += n_words
    if i < len(words):
        raise ValueError(f"unexpected word {words[i]!r} after the end of caption {text!r}")
    if found["background"] == found["color"]:
        raise ValueError(f"background {found['background']!r} equals the shape's color in {text!r}")
    return {name: found[name] for name in ATTRIBUTES}


def random_words(rng):
    """Uniformly drawn caption attributes; the background is uniform over the other 7 colors."""
    color = COLORS[rng.integers(len(COLORS))]
    backgrounds = [c for c in COLORS if c != color]
    return {"size": SIZES[rng.integers(len(SIZES))], "color": color,
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "position": POSITIONS[rng.integers(len(POSITIONS))],
            "background": backgrounds[rng.integers(len(backgrounds))]}


def scene_for(words, rng):
    """A scene that honours `words` (a parse_caption dict), with random geometry and color jitter."""
    span = float(rng.uniform(*SIZE_SPANS[words["size"]]))
    angle = 0.0
    if words["shape"] == "square" and rng.random() < SQUARE_ROTATED_FRACTION:
        angle = float(rng.uniform(0.0, 90.0))
    width, height = _box_size(words["shape"], span)
    center = _place(words["position"], width, height, rng)
    return Scene(**words, center=center, span=span, angle=angle,
                 rgb=_jitter(words["color"], rng), background_rgb=_jitter(words["background"], rng))


def random_scene(rng):
    """A uniformly random scene: random_words then scene_for."""
    return scene_for(random_words(rng), rng)


def _box_size(shape, span):
    """(width, height) of the shape's bounding box."""
    return (span, span * math.sqrt(3) / 2) if shape == "triangle" else (span, span)


def _place(position, width, height, rng):
    """The bounding box center for a position word (see the module docstring)."""
    middle = RESOLUTION / 2
    across = middle + rng.uniform(-JITTER, JITTER)
    if position == "in the center":
        return (float(across), float(middle + rng.uniform(-JITTER, JITTER)))
    gap = rng.uniform(*EDGE_GAP)
    if position == "on the left":
        return (float(gap + width / 2), float(across))
    if position == "on the right":
        return (float(RESOLUTION - gap - width / 2), float(across))
    if position == "at the top":
        return (float(across), float(gap + height / 2))
    return (float(across), float(RESOLUTION - gap - height / 2))


def _jitter(color, rng):
    rgb = np.asarray(COLOR_RGB[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def outline(scene):
    """The shape's polygon: a list of (x, y) vertices in pixel coordinates."""
    cx, cy = scene.center
    if scene.shape == "circle":
        t = np.linspace(0, 2 * np.pi, CIRCLE_VERTICES, endpoint=False)
        return list(zip(cx + scene.span / 2 * np.cos(t), cy + scene.span / 2 * np.sin(t)))
    if scene.shape == "triangle":
        half_width, half_height = scene.span / 2, scene.span * math.sqrt(3) / 4
        return [(cx, cy - half_height), (cx + half_width, cy + half_height),
                (cx - half_width, cy + half_height)]
    a = math.radians(scene.angle)
    half_side = scene.span / (abs(math.cos(a)) + abs(math.sin(a))) / 2
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    return [(cx + half_side * (u * math.cos(a) + v * math.sin(a)),
             cy + half_side * (v * math.cos(a) - u * math.sin(a))) for u, v in corners]


def render(scene):
    """The scene as a 64x64 RGB PIL image, anti-aliased by drawing at SUPERSAMPLE x and box filtering."""
    big = RESOLUTION * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background_rgb)
    points = _pull_in(np.asarray(outline(scene)) * SUPERSAMPLE, 0.5)
    ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=scene.rgb)
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def _pull_in(points, distance):
    """A regular polygon with every edge moved `distance` towards its center.

    Pillow truncates vertices to whole pixels and fills every pixel its outline touches, which
    grows a shape by half a pixel per axis-aligned side on average (a third on sloped sides);
    pulling the edges in by half a pixel leaves a bias under a fifth of a sub-pixel per side.
    """
    center = points.mean(axis=0)
    inradius = np.linalg.norm((points[0] + points[1]) / 2 - center)
    return center + (points - center) * (1 - distance / inradius)


def make_dataset(n, seed):
    """n random scenes: (uint8 images [n, 3, 64, 64], captions). Same seed, same data; the first k
    samples of make_dataset(n, seed) are make_dataset(k, seed)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(s)) for s in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [caption(s) for s in scenes]


def downsample(images, size):
    """uint8 images [N, 3, 64, 64] box-filtered to size x size (size divides 64): every word of the
    caption keeps its meaning, each length in pixels scaled by size / 64."""
    k = images.shape[-1] // size
    if k * size != images.shape[-1]:
        raise ValueError(f"resolution {size} does not divide the scenes' {images.shape[-1]} pixels")
    return torch.nn.functional.avg_pool2d(images.float(), k).round().to(torch.uint8)


def held_out_captions(seed):
    """EVAL_CAPTIONS distinct captions for evaluation, covering every size, color, shape, position and
    background at least once (each color 5 times as color and 5 times as background).

    make_dataset samples all 1680 captions uniformly, so a training set of thousands of scenes sees
    (nearly) every caption: "held out" means new renders. Evaluate by generating from these captions
    and reading the images back (ldm_nodes/tools/scene_analysis.py); render references with scene_for and a
    seed of your own.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    sizes, colors, shapes, positions = (list(rng.permutation(v)) for v in (SIZES, COLORS, SHAPES, POSITIONS))
    captions = []
    for i in range(EVAL_CAPTIONS):
        color = i % len(colors)
        background = (color + 1 + i // len(colors)) % len(colors)
        captions.append(f"a {sizes[i % len(sizes)]} {colors[color]} {shapes[i % len(shapes)]} "
                        f"{positions[i % len(positions)]} "
                        f"on a {colors[background]} background")
    return captions
