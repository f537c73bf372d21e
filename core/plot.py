"""A picture of the variational bound: which timesteps cost the bits (Ho et al. 2020, eq. 5).

Drawn with Pillow alone: the per-timestep terms L_{t-1} (t = 2..T) of a VariationalBound against t on a
log scale, L_0 at t = 1 in another color, and the total with its parts in the title. Values are per
dimension, in the bound's unit (bits/dim for pixels, nats/dim for latents), so the terms add up to the
total (all timesteps) or, times (T - 1) / K, estimate it (strided). plot_classification draws candidate
prompts ranked by their bound (core/classify.py), plot_training a run's curves, and picture_grid the
training pictures with their captions that `train --dry-run` writes.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 62, 40
TERM_COLOR, DECODER_COLOR, AXIS_COLOR, GRID_COLOR = (40, 90, 200), (210, 60, 40), (30, 30, 30), (225, 225, 225)


def axes(draw, font, box, y_ticks, x_ticks):
    """A plot's frame: box (x0, y0, x1, y1), a grid line and label at each (y, label) of y_ticks, a tick and
    label under the box at each (x, label) of x_ticks."""
    x0, y0, x1, y1 = box
    for y, label in y_ticks:
        draw.line([(x0, y), (x1, y)], fill=GRID_COLOR)
        draw.text((x0 - 6, y), label, fill=AXIS_COLOR, font=font, anchor="rm")
    for x, label in x_ticks:
        draw.line([(x, y1), (x, y1 + 4)], fill=AXIS_COLOR)
        draw.text((x, y1 + 6), label, fill=AXIS_COLOR, font=font, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=AXIS_COLOR)


def per_dim(bound):
    """Nats per image -> the bound's unit per dimension."""
    return bound.dims * (math.log(2) if bound.unit == "bits/dim" else 1.0)


def plot_bound(bound):
    """The bound of a batch as an RGB PIL image: terms averaged over the images (all timesteps) or every
    image's sampled terms (strided)."""
    scale = per_dim(bound)
    T = bound.terms.shape[1] + 1 if bound.standard_error is None else None
    t = (bound.timesteps + 1).double().numpy()  # the paper's t
    terms = (bound.terms / scale).numpy()
    if T is not None:
        t, terms = t[0], terms.mean(0)
    t, terms = t.ravel(), terms.ravel()
    decoder = float(bound.decoder.mean() / scale)
    t_max = max(float(t.max()), 2.0) if T is None else float(T)

    positive = np.concatenate([terms[terms > 0], [decoder] if decoder > 0 else []])
    low = math.floor(math.log10(positive.min())) if len(positive) else -6
    high = math.ceil(math.log10(positive.max())) if len(positive) else 0
    high = max(high, low + 1)

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM

    def px(tt, value):
        x = x0 + (x1 - x0) * (tt - 1) / max(t_max - 1, 1)
        v = min(max(math.log10(value), low), high) if value > 0 else low
        return x, y1 - (y1 - y0) * (v - low) / (high - low)

    axes(draw, font, (x0, y0, x1, y1), [(px(1, 10.0 ** d)[1], f"1e{d}") for d in range(low, high + 1)],
         [(px(tt, 1)[0], f"{tt:.0f}") for tt in (1 + (t_max - 1) * k / 4 for k in range(5))])

    points = [px(a, b) for a, b in zip(t, terms)]
    if T is not None and len(points) > 1:
        draw.line(points, fill=TERM_COLOR, width=2)
    else:
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=TERM_COLOR)
    x, y = px(1, decoder)
    draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=DECODER_COLOR)

    unit = bound.unit
    total = float(bound.total.mean())
    estimate = "all timesteps" if T is not None else f"{bound.terms.shape[1]} sampled timesteps"
    error = "" if bound.standard_error is None else f" +- {float(bound.standard_error.pow(2).mean().sqrt()):.3f}"
    draw.text((x0, 8), f"bound {total:.4f}{error} {unit} ({len(bound.total)} image(s), {estimate})",
              fill=AXIS_COLOR, font=font)
    draw.text((x0, 24), f"L_T {float(bound.prior.mean() / scale):.3g}   L_0 (red) {decoder:.3g}   "
                        f"sum of L_t-1 (blue) {total - decoder - float(bound.prior.mean() / scale):.3g}",
              fill=AXIS_COLOR, font=font)
    draw.text(((x0 + x1) / 2, HEIGHT - 14), "timestep t", fill=AXIS_COLOR, font=font, anchor="mm")
    draw.text((x0, y0 - 14), f"term per timestep [{unit}], log scale", fill=AXIS_COLOR, font=font)
    return image


LOSS_COLOR = (40, 90, 200)


def plot_training(history):
    """A run's curves as an RGB PIL image: the smoothed training loss (log scale) on top and, when the
    run has a held-out split, its variational bound below, both against the step. history: the
    trainer's {"loss": [[step, loss], ...], "held_out_bound": [[step, bound, standard error], ...], "unit"}."""
    panels = [("training loss (smoothed), log scale", history.get("loss", []), True, LOSS_COLOR)]
    if history.get("held_out_bound"):
        panels.append((f"held-out bound [{history.get('unit', '')}]", history["held_out_bound"], False, DECODER_COLOR))
    image = Image.new("RGB", (WIDTH, HEIGHT * len(panels)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    last_step = max([row[0] for _, rows, _, _ in panels for row in rows] + [1])
    for k, (title, rows, log, color) in enumerate(panels):
        x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT * k + TOP, HEIGHT * (k + 1) - BOTTOM
        values = [math.log10(v) if log else v for _, v, *_ in rows if not log or v > 0]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        high = high if high > low else low + 1.0

        def px(step, value):
            v = math.log10(value) if log else value
            return x0 + (x1 - x0) * step / last_step, y1 - (y1 - y0) * (v - low) / (high - low)

        draw.rectangle([x0, y0, x1, y1], outline=AXIS_COLOR)
        for frac in (0, 0.5, 1):
            v = low + (high - low) * frac
            y = y1 - (y1 - y0) * frac
            draw.line([(x0, y), (x1, y)], fill=GRID_COLOR)
            draw.text((x0 - 6, y), f"{10 ** v:.3g}" if log else f"{v:.4g}", fill=AXIS_COLOR, font=font, anchor="rm")
        for frac in (0, 0.5, 1):
            x = x0 + (x1 - x0) * frac
            draw.text((x, y1 + 6), f"{last_step * frac:.0f}", fill=AXIS_COLOR, font=font, anchor="mt")
        points = [px(step, value) for step, value, *_ in rows if not log or value > 0]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        latest = f": {rows[-1][1]:.4g} at step {rows[-1][0]}" if rows else ""
        draw.text((x0, y0 - 20), title + latest, fill=AXIS_COLOR, font=font)
        draw.text(((x0 + x1) / 2, y1 + 22), "step", fill=AXIS_COLOR, font=font, anchor="mm")
    return image


BEST_COLOR = (40, 150, 60)


def plot_classification(result, prompts):
    """Candidates ranked by their bound (a core/classify.Classification) as an RGB PIL image: one row per
    prompt, best first, a dot at its bound minus the best's and a bar of +- 2 standard errors of that paired
    difference (the best, in green, at 0); the prompt under its row."""
    rows = len(prompts)
    height = max(HEIGHT, TOP + BOTTOM + 34 * rows)
    row_height = min(60, (height - TOP - BOTTOM) / rows)
    best = float(result.bounds[result.ranking[0]])
    gaps = [float(result.bounds[c]) - best for c in result.ranking]
    errors = [2 * float(result.standard_error[c]) for c in result.ranking]
    high = max([g + e for g, e in zip(gaps, errors)] + [1e-6]) * 1.05
    image = Image.new("RGB", (WIDTH, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, height - BOTTOM

    def px(value):
        return x0 + 8 + (x1 - x0 - 16) * value / high

    axes(draw, font, (x0, y0, x1, y1), [], [(px(high * k / 4), f"{high * k / 4:.3g}") for k in range(5)])
    for rank, (c, gap, error) in enumerate(zip(result.ranking, gaps, errors)):
        y = y0 + row_height * rank + 12
        color = BEST_COLOR if rank == 0 else TERM_COLOR
        draw.text((x0 - 6, y), f"{rank + 1}", fill=AXIS_COLOR, font=font, anchor="rm")
        if error > 0:
            draw.line([(px(max(gap - error, 0)), y), (px(gap + error), y)], fill=color, width=2)
        draw.ellipse([px(gap) - 4, y - 4, px(gap) + 4, y + 4], fill=color)
        draw.text((x0 + 8, y + 8), prompts[c][:90], fill=AXIS_COLOR, font=font)
    draw.text((x0, 8), f"best: {prompts[result.ranking[0]][:80]}", fill=AXIS_COLOR, font=font)
    draw.text((x0, 24), f"bound {best:.4f} {result.unit}, {result.terms.shape[1]} timesteps shared by the "
                        f"{rows} prompts", fill=AXIS_COLOR, font=font)
    draw.text(((x0 + x1) / 2, height - 14), f"bound minus the best's [{result.unit}], bars +- 2 standard errors",
              fill=AXIS_COLOR, font=font, anchor="mm")
    return image


CELL, CAPTION_LINES = 96, 2  # each picture drawn at least this many pixels wide, with two caption lines


def picture_grid(images, captions, columns=8):
    """Training pictures as the trainer sees them (uint8 [N, 3, R, R]), each scaled up by a whole factor
    (nearest, so no pixel is invented) to at least CELL pixels, its caption in two lines beneath; an RGB
    PIL image. An empty caption is shown as (no caption)."""
    font = ImageFont.load_default()
    n, size = len(images), images.shape[-1]
    zoom = max(1, -(-CELL // size))
    cell, text_height, pad = size * zoom, 12 * CAPTION_LINES, 4
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + text_height + 2 * pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(4, cell // 6)  # the default font is about 6 pixels a character
    for k in range(n):
        x = pad + (k % columns) * (cell + pad)
        y = pad + (k // columns) * (cell + text_height + 2 * pad)
        picture = Image.fromarray(images[k].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
        sheet.paste(picture, (x, y))
        draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=GRID_COLOR)
        text = captions[k] or "(no caption)"
        lines = [text[i:i + chars] for i in range(0, len(text), chars)][:CAPTION_LINES]
        if len(text) > chars * CAPTION_LINES:
            lines[-1] = lines[-1][:-3] + "..."
        for j, line in enumerate(lines):
            draw.text((x, y + cell + pad + 12 * j), line, fill=AXIS_COLOR, font=font)
    return sheet
