"""The run folder (laid out in docs/training.md): checkpoints for exact resume, the loss log and its plot, the
validation grid, Ctrl-C. A checkpoint holds every piece of state a step reads, so a resumed run continues bit for bit;
every file is written atomically (files.py), so a crash or a full disk leaves the previous checkpoint intact."""

from __future__ import annotations

import csv
import io
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minidream.files import atomic_write, write_text

CHECKPOINT = re.compile(r"^step-(\d{6})\.pt$")
LOG_COLUMNS = ("step", "loss", "instance_loss", "prior_loss", "lr", "grad_norm", "skipped", "seconds")


def new_folder(path) -> Path:
    """Make the folder `path`, or path-2, path-3, ... if it exists. mkdir either creates or fails, so two
    processes starting at once never get the same folder, and nothing already written is ever reused."""
    folder, n = Path(path), 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
            folder = Path(f"{path}-{n}")


def new_run_folder(out, subject_name: str) -> Path:
    """out/<subject>-<YYYYmmdd-HHMMSS> (-2, -3, ... if two runs start in the same second)."""
    return new_folder(Path(out) / f"{subject_name}-{time.strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------- RNG states

def rng_states(generator: torch.Generator) -> dict:
    """Every RNG a step may read: the training generator, torch's CPU and CUDA ones, Python's and NumPy's; as
    tensors and plain Python values, so that torch.load(weights_only=True) reads them back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached}}


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# ----------------------------------------------------------------------------- checkpoints

def list_checkpoints(run: Path) -> list[Path]:
    folder = Path(run) / "checkpoints"
    return sorted(p for p in folder.iterdir() if CHECKPOINT.match(p.name)) if folder.is_dir() else []


def save_checkpoint(run: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN.pt atomically, then (only once it is complete) delete all but the newest `keep`."""
    path = atomic_write(Path(run) / "checkpoints" / f"step-{step:06d}.pt", lambda tmp: torch.save(state, tmp))
    if keep > 0:
        for old in list_checkpoints(run)[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run: Path) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint of a run that loads; a damaged one is skipped with a message."""
    for path in reversed(list_checkpoints(run)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt: fall back to the one before
            print(f"warning: cannot read {path} ({type(e).__name__}: {e}); trying the previous checkpoint")
    return None, None


# ----------------------------------------------------------------------------- loss log

def write_loss_csv(path: Path, rows: list[dict]) -> None:
    """The whole log, rewritten atomically (a few KB: cheaper to rewrite than to repair)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (diffusion losses are noisy: each step draws its own timestep)."""
    sums = np.cumsum([0.0, *values])  # sums[i] = values[0] + ... + values[i - 1]
    return [float(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


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
        draw.line([xy(s, v) for s, v in zip(steps, values)], fill=color, width=1 if color[0] == 190 else 2)
    legend = f"loss (grey), mean of {window} (blue)" + (", prior term (orange)" if len(series) > 2 else "")
    for position, text in [((4, top - 4), f"{hi:.4g}"), ((4, height - bottom - 8), f"{lo:.4g}"),
                           ((left, height - bottom + 6), f"step {s0}"),
                           ((width - right - 70, height - bottom + 6), f"step {s1}"), ((left, 8), legend)]:
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


def labelled_grid(images: list[Image.Image], row_labels: list[str], column_labels: list[str] | None = None
                  ) -> Image.Image:
    """One row per row label (its text on the left, in a column as wide as the longest line needs), the
    images of that row beside it, and `column_labels` (e.g. seeds) above the columns. Pictures under
    MIN_TILE px (the tiny model's 64 px) are enlarged by a whole factor, pixels kept sharp."""
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


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: timeout, docker stop, SLURM


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal once its checkpoint is saved (or at once, by a second signal); the
    script exits with 128 + signum, as a process killed by that signal would: 130 Ctrl-C, 143 SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(STOP_SIGNALS.get(signum, f"signal {signum}"))
        self.signum = signum


class StopRequest:
    """Turn the first Ctrl-C or SIGTERM into a request the loop sees at the end of its step (it saves a
    checkpoint and returns); a second one interrupts at once. Under torchrun one key press arrives twice,
    from the terminal and forwarded, a moment apart: a second signal within `grace` seconds counts as the
    same one. A signal the caller ignores (nohup ignores SIGINT) stays ignored."""

    def __init__(self, grace: float = 2.0):
        self.requested, self.signum, self.grace = False, None, grace
        self._previous, self._first = {}, 0.0  # the handlers to restore; when the first signal came

    def _handler(self, signum, frame):
        if self.requested and time.monotonic() - self._first > self.grace:
            raise Stopped(signum)
        if not self.requested:
            self.requested, self.signum, self._first = True, signum, time.monotonic()
            print(f"\n{STOP_SIGNALS[signum]}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C or SIGTERM again aborts at once)")

    def __enter__(self):
        for signum in STOP_SIGNALS:
            try:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
