"""Atomic writes: a crash, a Ctrl-C or a full disk never leaves a half-written file. Each is written
to a temporary name in its folder, then os.replace'd over the target (atomic on POSIX, Windows)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

from PIL import Image, PngImagePlugin


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """write(tmp), then rename tmp to `path`; on any error tmp is removed and the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the user's usual permissions, whatever the writer chose
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        # torch, safetensors and PIL say "No space left" without errno or file name: add them
        if "No space left on device" in str(e) and not getattr(e, "filename", None):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_png(path, image: Image.Image, metadata: dict | None = None) -> Path:
    """Save a PNG whose text chunks hold `metadata` (prompt, seed, sampler, ...)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_json(path: Path, error: type) -> dict:
    """A JSON object file (config.json, subject.json, ...), or `error` naming it and the fix."""
    try:
        too_big = path.stat().st_size >= 2**24
        value = "a file over 16 MB" if too_big else json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8 or JSON, too deep
        value = e
    if not isinstance(value, dict):
        raise error(f"{path} is not valid JSON holding an object {{...}} ({str(value)[:80]}); "
                    "fix or replace it")
    return value
