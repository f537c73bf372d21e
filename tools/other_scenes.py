"""Scenes of core/data.py's caption grammar drawn by a second, independent renderer, for testing
classification on images the built-in models never saw from any renderer they were trained on.

Independent of core/data.py's drawing: its own palette (the colour names' common RGB values, not
COLOR_RGB), Pillow's own primitives (ellipse, rectangle, regular_polygon) at 8x supersampling with a
Lanczos reduction (core/data.py: its own polygons at 4x, box-filtered), its own placement. Only the
grammar's words and their meanings are shared: size "small" spans 12..20 px and "large" 26..36 px
(bounding box), positions are 1..3 px from the named edge, within 3 px of the middle across it.

    questions(n, seed) -> [(image uint8 [64, 64, 3], true caption, candidate captions)]

Half colour questions (4 candidates: the true colour and 3 others, none equal to the background), half
shape questions (the 3 shapes), every other word of the caption shared by the candidates.
"""
import numpy as np
from PIL import Image, ImageDraw

from ..core.data import COLORS, POSITIONS, SHAPES, SIZES

PALETTE = {"red": (230, 40, 40), "orange": (250, 140, 30), "yellow": (250, 220, 50), "green": (50, 160, 70),
           "blue": (50, 90, 230), "purple": (130, 60, 180), "white": (248, 248, 248), "black": (12, 12, 12)}
SPANS = {"small": (12, 20), "large": (26, 36)}
SIZE, SCALE = 64, 8


def draw(color, shape, size, position, background, rng):
    """One 64x64 scene as uint8 [64, 64, 3]."""
    span = rng.uniform(*SPANS[size])
    height = span * 3 ** 0.5 / 2 if shape == "triangle" else span
    gap, across = rng.uniform(1, 3), SIZE / 2 + rng.uniform(-3, 3)
    cx, cy = {"on the left": (gap + span / 2, across), "on the right": (SIZE - gap - span / 2, across),
              "at the top": (across, gap + height / 2), "at the bottom": (across, SIZE - gap - height / 2),
              "in the center": (across, SIZE / 2 + rng.uniform(-3, 3))}[position]
    image = Image.new("RGB", (SIZE * SCALE, SIZE * SCALE), PALETTE[background])
    pen = ImageDraw.Draw(image)
    x, y, r = cx * SCALE, cy * SCALE, span * SCALE / 2
    fill = PALETTE[color]
    if shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        angle = rng.uniform(0, 90) if rng.random() < 0.5 else 0.0
        # a square turned by a spans side * (|cos a| + |sin a|): its circumradius from the span
        a = np.radians(angle)
        side = 2 * r / (abs(np.cos(a)) + abs(np.sin(a)))
        pen.regular_polygon((x, y, side / 2 ** 0.5), 4, rotation=angle, fill=fill)  # rotation 0: upright
    else:  # apex up; the bounding box centre is the midpoint of its height, the circumcentre 1/6 height lower
        pen.regular_polygon((x, y + height * SCALE / 6, span * SCALE / 3 ** 0.5), 3, fill=fill)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.LANCZOS))


def caption(color, shape, size, position, background):
    return f"a {size} {color} {shape} {position} on a {background} background"


def questions(n, seed):
    """n questions (the first half colour, the rest shape), reproducible from the seed."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        words = {"size": SIZES[rng.integers(2)], "shape": SHAPES[rng.integers(3)],
                 "position": POSITIONS[rng.integers(5)]}
        color, background = rng.choice(len(COLORS), 2, replace=False)
        words["color"], words["background"] = COLORS[color], COLORS[background]
        image = draw(**words, rng=rng)
        if k < n // 2:
            others = [c for c in COLORS if c not in (words["color"], words["background"])]
            pool = [words["color"], *rng.choice(others, 3, replace=False)]
            candidates = [caption(**{**words, "color": str(c)}) for c in pool]
        else:
            candidates = [caption(**{**words, "shape": s}) for s in SHAPES]
        order = rng.permutation(len(candidates))  # the true caption at a random place
        out.append((image, caption(**words), [candidates[i] for i in order]))
    return out
