"""Writing files so that a crash, a Ctrl-C or a full disk never leaves a half-written one.

Every file minidream writes goes to a temporary name in the same folder first and is renamed
over the target only once it is complete: `os.replace` is atomic on POSIX and Windows, so a
reader sees either the old file or the new one. If writing fails (e.g. ENOSPC, disk full) the
temporary file is removed and the previous file stays intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, PngImagePlugin


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path to `path`; on any error remove tmp_path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def torch_save(path, obj) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_png(path, image: Image.Image, metadata: dict | None = None) -> Path:
    """Save a PNG whose text chunks hold `metadata` (prompt, seed, sampler, ...)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """A contact sheet: images row by row, `columns` per row (default: about square)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or max(1, round(len(images) ** 0.5))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid
