"""core/data.py (the procedural captioned dataset) and ldm_nodes/tools/scene_analysis.py (reading scenes back)."""
import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm_nodes.core import data
from ldm_nodes.tools import scene_analysis as analysis
from ldm_nodes.core.data import (
    ATTRIBUTES, COLOR_RGB, COLORS, POSITIONS, SHAPES, SIZE_SPANS, SIZES, caption, held_out_captions,
    make_dataset, parse_caption, random_scene, render, scene_for,
)


# The words' meaning, as the README's prompts rely on it: (dx, dy) is the bounding box center's
# offset from the canvas center in pixels, y pointing down.
REGIONS = {
    "on the left": lambda dx, dy: dx <= -11 and abs(dy) <= 3,
    "on the right": lambda dx, dy: dx >= 11 and abs(dy) <= 3,
    "at the top": lambda dx, dy: dy <= -11 and abs(dx) <= 3,
    "at the bottom": lambda dx, dy: dy >= 11 and abs(dx) <= 3,
    "in the center": lambda dx, dy: abs(dx) <= 3 and abs(dy) <= 3,
}


def rng(seed):
    return np.random.Generator(np.random.PCG64(seed))


def scenes(n, seed):
    generator = rng(seed)
    return [random_scene(generator) for _ in range(n)]


def coverage(scene, image):
    """How much of each pixel the shape covers, read from the image and the scene's two colors."""
    pixels = np.asarray(image, dtype=np.float64)
    background, color = np.asarray(scene.background_rgb), np.asarray(scene.rgb)
    return (pixels - background) @ (color - background) / np.sum((color - background) ** 2)


def bounding_box(scene):
    """(x0, y0, x1, y1) of the shape the scene declares."""
    width = scene.span
    height = scene.span * math.sqrt(3) / 2 if scene.shape == "triangle" else scene.span
    cx, cy = scene.center
    return cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2


def degrade(image, generator, noise_std=8.0, blur=1.0):
    """What a small diffusion model's sample looks like: a Gaussian blur (std in pixels) and pixel
    noise (std in 0..255 units)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    return np.clip(np.round(blurred + generator.normal(0, noise_std, blurred.shape)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_make_dataset_is_deterministic_per_seed():
    images, captions = make_dataset(12, seed=3)
    again, captions_again = make_dataset(12, seed=3)
    other, other_captions = make_dataset(12, seed=4)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other) and captions != other_captions
    prefix, prefix_captions = make_dataset(5, seed=3)
    assert torch.equal(prefix, images[:5]) and prefix_captions == captions[:5]


def test_make_dataset_ignores_global_random_state():
    np.random.seed(0)
    torch.manual_seed(0)
    first = make_dataset(4, seed=9)
    np.random.seed(1)
    torch.manual_seed(1)
    second = make_dataset(4, seed=9)
    assert torch.equal(first[0], second[0]) and first[1] == second[1]


def test_images_match_their_captions():
    images, captions = make_dataset(6, seed=5)
    generator = rng(5)
    for image, text in zip(images, captions):
        scene = random_scene(generator)
        assert text == caption(scene)
        assert torch.equal(image, torch.from_numpy(np.array(render(scene))).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Caption grammar


def test_vocabulary_is_the_contract():
    assert SIZES == ("small", "large")
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
    assert SHAPES == ("circle", "square", "triangle")
    assert set(POSITIONS) == {"on the left", "on the right", "at the top", "at the bottom", "in the center"}
    assert set(COLOR_RGB) == set(COLORS)
    assert SIZE_SPANS == {"small": (12, 20), "large": (26, 36)}


def test_captions_follow_the_grammar_and_parse_back():
    pattern = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
                         rf"({'|'.join(POSITIONS)}) on a ({'|'.join(COLORS)}) background")
    seen = {name: [] for name in ATTRIBUTES}
    for scene in scenes(2000, seed=1):
        text = caption(scene)
        assert pattern.fullmatch(text), text
        assert parse_caption(text) == scene.words
        assert scene.background != scene.color
        for name in ATTRIBUTES:
            seen[name].append(scene.words[name])
    for name, values in zip(ATTRIBUTES, (SIZES, COLORS, SHAPES, POSITIONS, COLORS)):
        counts = {value: seen[name].count(value) for value in values}
        expected = 2000 / len(values)
        assert all(0.7 * expected < count < 1.3 * expected for count in counts.values()), (name, counts)


def test_parse_caption_normalises_case_and_spaces():
    assert parse_caption("  A Large  RED triangle at the   bottom on a white background ") == {
        "size": "large", "color": "red", "shape": "triangle", "position": "at the bottom",
        "background": "white"}


@pytest.mark.parametrize("text, bad_word", [
    ("a huge red circle in the center on a blue background", "'huge'"),
    ("a small pink circle in the center on a blue background", "'pink'"),
    ("a small red hexagon in the center on a blue background", "'hexagon'"),
    ("a small red circle on the top on a blue background", "'on the top'"),
    ("a small red circle in the center on a grey background", "'grey'"),
    ("the small red circle in the center on a blue background", "'the'"),
    ("a small red circle in the center over a blue background", "'over'"),
    ("a small red circle in the center on a blue background now", "'now'"),
    ("a small red circle in the center on a blue", "ends early"),
    ("a small red circle in the center on a red background", "equals the shape's color"),
])
def test_parse_caption_names_what_is_wrong(text, bad_word):
    with pytest.raises(ValueError, match=re.escape(bad_word)):
        parse_caption(text)


# ---------------------------------------------------------------------------------------------
# Geometry and colors honour the words


def test_drawn_span_and_area_match_the_declared_span():
    """The pixels the shape touches start within (-1, +0.5] px of its declared bounding box and end
    within [-0.5, +1) px of it, so the drawn span is the declared one to a pixel; the covered area
    is the declared shape's area to 0.2 px along its outline, and to 0.05 px on average."""
    area_errors = []
    for scene in scenes(500, seed=2):
        low, high = SIZE_SPANS[scene.size]
        assert low <= scene.span <= high
        cover = coverage(scene, render(scene))
        columns, rows = np.nonzero(cover.max(axis=0) > 0.02)[0], np.nonzero(cover.max(axis=1) > 0.02)[0]
        x0, y0, x1, y1 = bounding_box(scene)
        assert x0 - 1 < columns[0] <= x0 + 0.5 and x1 - 0.5 <= columns[-1] + 1 < x1 + 1, scene
        assert y0 - 1 < rows[0] <= y0 + 0.5 and y1 - 0.5 <= rows[-1] + 1 < y1 + 1, scene
        drawn_span = max(columns[-1] + 1 - columns[0], rows[-1] + 1 - rows[0])
        assert low - 1 <= drawn_span <= high + 2
        side = scene.span / (abs(math.cos(math.radians(scene.angle))) + abs(math.sin(math.radians(scene.angle))))
        area, perimeter = {"circle": (math.pi * scene.span ** 2 / 4, math.pi * scene.span),
                           "triangle": (math.sqrt(3) / 4 * scene.span ** 2, 3 * scene.span),
                           "square": (side ** 2, 4 * side)}[scene.shape]
        area_errors.append((cover.sum() - area) / perimeter)
        assert abs(area_errors[-1]) <= 0.2, scene
    assert abs(np.mean(area_errors)) <= 0.05


def test_positions_lie_in_their_regions():
    """The coverage centroid measured from the render (for an apex-up triangle it lies a sixth of
    the height below the bounding box center) is within 0.25 px of the scene's center, which lies in
    its word's region."""
    ys, xs = np.mgrid[:64, :64] + 0.5
    for scene in scenes(500, seed=3):
        cover = coverage(scene, render(scene))
        centroid = np.array([(cover * xs).sum(), (cover * ys).sum()]) / cover.sum()
        if scene.shape == "triangle":
            centroid[1] -= scene.span * math.sqrt(3) / 12
        assert np.abs(centroid - scene.center).max() < 0.25, scene
        assert REGIONS[scene.position](*(np.asarray(scene.center) - 32)), scene


def test_shapes_stay_inside_the_canvas():
    for scene in scenes(500, seed=4):
        x0, y0, x1, y1 = bounding_box(scene)
        assert min(x0, y0) >= 1 and max(x1, y1) <= 63, scene
        pixels = np.asarray(render(scene))
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (ring == scene.background_rgb).all(), scene


def test_squares_are_sometimes_rotated_and_other_shapes_never():
    angles = {shape: [s.angle for s in scenes(600, seed=5) if s.shape == shape] for shape in SHAPES}
    assert set(angles["circle"]) == {0.0} and set(angles["triangle"]) == {0.0}
    rotated = [a for a in angles["square"] if a != 0.0]
    assert 0.3 < len(rotated) / len(angles["square"]) < 0.7 and all(0 < a < 90 for a in rotated)


def test_edges_are_anti_aliased():
    scene = scenes(1, seed=6)[0]
    cover = coverage(scene, render(scene))
    assert ((cover > 0.05) & (cover < 0.95)).sum() >= 10


def test_named_colors_stay_apart_after_variation():
    """Every drawn color (each channel within COLOR_JITTER) is nearer its own name than any other by
    a wide margin, also at the corners of the jitter cube."""
    jitters = np.array(list(itertools.product((-data.COLOR_JITTER, data.COLOR_JITTER), repeat=3)))
    for name, rgb in COLOR_RGB.items():
        for drawn in np.clip(np.asarray(rgb) + jitters, 0, 255):
            distances = {other: np.linalg.norm(drawn - np.asarray(value)) for other, value in COLOR_RGB.items()}
            ranked = sorted(distances, key=distances.get)
            assert ranked[0] == name and distances[ranked[1]] - distances[name] > 50, (name, drawn)
    for scene in scenes(300, seed=7):
        assert np.abs(np.subtract(scene.rgb, COLOR_RGB[scene.color])).max() <= data.COLOR_JITTER
        assert np.abs(np.subtract(scene.background_rgb, COLOR_RGB[scene.background])).max() <= data.COLOR_JITTER


# ---------------------------------------------------------------------------------------------
# Held-out evaluation captions


def test_held_out_captions_cover_every_word():
    captions = held_out_captions(seed=0)
    assert captions == held_out_captions(seed=0) and captions != held_out_captions(seed=1)
    assert 40 <= len(captions) <= 60 and len(set(captions)) == len(captions)
    words = [parse_caption(text) for text in captions]
    for name, values in zip(ATTRIBUTES, (SIZES, COLORS, SHAPES, POSITIONS, COLORS)):
        assert {w[name] for w in words} == set(values), name


# ---------------------------------------------------------------------------------------------
# Reading scenes back (ldm_nodes/tools/scene_analysis.py)


def test_analysis_position_regions_hold_every_placement():
    for scene in scenes(2000, seed=8):
        x_min, x_max, y_min, y_max = analysis.POSITION_BOXES[scene.position]
        dx, dy = np.asarray(scene.center) - 32
        assert x_min <= dx <= x_max and y_min <= dy <= y_max, scene


def test_analysis_reads_back_every_drawn_scene():
    generator = rng(9)
    drawn = scenes(500, seed=10) + [scene_for(parse_caption(t), generator) for t in held_out_captions(0)]
    for scene in drawn:
        result = analysis.analyse(render(scene))
        assert {name: result[name] for name in ATTRIBUTES} == scene.words, (scene, result)
        assert result["confidence"] > 0.5, (scene, result)


@pytest.mark.parametrize("noise_std, blur, n, required", [(8.0, 1.0, 500, 0.98), (16.0, 1.5, 400, 0.97)])
def test_analysis_is_robust_to_blur_and_noise(noise_std, blur, n, required):
    """The share of scenes whose five words are all read back correctly after degrading."""
    noise = rng(11)
    drawn = scenes(n, seed=12)
    results = [analysis.analyse(degrade(render(scene), noise, noise_std, blur)) for scene in drawn]
    correct = sum({name: r[name] for name in ATTRIBUTES} == scene.words for r, scene in zip(results, drawn))
    assert correct >= required * n


def test_analysis_finds_no_shape_on_a_plain_image():
    plain = degrade(Image.new("RGB", (64, 64), COLOR_RGB["purple"]), rng(13))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = analysis.analyse(plain)
    assert result == {"background": "purple", "color": None, "shape": None, "position": None, "size": None,
                      "confidence": 0.0}


def test_analysis_rejects_other_image_sizes():
    with pytest.raises(ValueError, match="64x64"):
        analysis.analyse(Image.new("RGB", (32, 32)))
