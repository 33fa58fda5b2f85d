"""Pictures of a run for people to look at: the loss curve (loss.png) and labelled image grids
(validation/step-N.png, sample.py's grid.png)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (diffusion losses are noisy: each step draws its own timestep)."""
    sums = np.cumsum([0.0, *values])  # sums[i] = values[0] + ... + values[i - 1]
    return [float(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window)
            for i in range(len(values))]


def draw_loss_curve(rows: list[dict], size=(720, 400)) -> Image.Image:
    """Loss per step (grey), its moving average (blue), and the prior term's average (orange)."""
    width, height = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    finite = [r for r in rows if np.isfinite(r["loss"])]
    if not finite:
        draw.text((left, top), "no finite loss yet", fill="black", font=font)
        return img
    steps = [r["step"] for r in finite]
    window = max(1, len(finite) // 20)
    series = [([r["loss"] for r in finite], (190, 190, 190)),
              (smooth([r["loss"] for r in finite], window), (31, 119, 180))]
    if any(r["prior_loss"] for r in finite):
        series.append((smooth([r["prior_loss"] for r in finite], window), (255, 127, 14)))
    lo, hi = min(min(v) for v, _ in series), max(max(v) for v, _ in series)
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, value):
        return (left + (step - s0) / (s1 - s0) * (width - left - right),
                top + (hi - value) / (hi - lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for values, color in series:
        line_width = 1 if color[0] == 190 else 2
        draw.line([xy(s, v) for s, v in zip(steps, values)], fill=color, width=line_width)
    legend = f"loss (grey), mean of {window} (blue)" + (", prior term (orange)" * (len(series) > 2))
    for position, text in [((4, top - 4), f"{hi:.4g}"), ((4, height - bottom - 8), f"{lo:.4g}"),
                           ((left, height - bottom + 6), f"step {s0}"), ((left, 8), legend),
                           ((width - right - 70, height - bottom + 6), f"step {s1}")]:
        draw.text(position, text, fill="black", font=font)
    return img


MIN_TILE = 128  # px


def wrap(text: str, font, width: int) -> str:
    """`text` broken into lines no wider than `width` px (a longer single word keeps its line)."""
    lines = [""]
    for word in text.split():
        fits = font.getlength(f"{lines[-1]} {word}") <= width
        lines[-1:] = [f"{lines[-1]} {word}".strip()] if fits or not lines[-1] else [lines[-1], word]
    return "\n".join(lines)


def labelled_grid(images: list[Image.Image], row_labels: list[str],
                  column_labels: list[str] | None = None) -> Image.Image:
    """One row per row label (its text on the left, in a column as wide as the longest line needs),
    the images of that row beside it, and `column_labels` (e.g. seeds) above the columns. Pictures
    under MIN_TILE px (the tiny model's 64 px) are enlarged by a whole factor, pixels kept sharp."""
    columns = len(images) // len(row_labels)
    factor = max(1, -(-MIN_TILE // images[0].width))  # ceil(MIN_TILE / width)
    images = [im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in images]
    side, height = images[0].size
    font = ImageFont.load_default(size=max(12, min(side, 512) // 11))  # scalable (Pillow >= 10.1)
    labels = [wrap(text, font, max(side, 192)) for text in row_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(measure.multiline_textbbox((0, 0), t, font=font)[2] for t in labels) + 12
    top = font.size + 10 if column_labels else 0
    grid = Image.new("RGB", (label_width + columns * side, top + len(labels) * height), "white")
    draw = ImageDraw.Draw(grid)
    for col, text in enumerate(column_labels or []):
        draw.text((label_width + col * side + 4, 4), text, fill="black", font=font)
    for row, text in enumerate(labels):
        draw.multiline_text((6, top + row * height + 4), text, fill="black", font=font)
        for col in range(columns):
            grid.paste(images[row * columns + col], (label_width + col * side, top + row * height))
    return grid
