"""The run folder (laid out in docs/training.md): checkpoints for exact resume, the loss log,
Ctrl-C and SIGTERM. A checkpoint holds every piece of state a step reads, so a resumed
run continues bit for bit; every file is written atomically (files.py), so a crash or a full disk
leaves the previous checkpoint intact."""

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

from minidream.files import atomic_write, write_text

CHECKPOINT = re.compile(r"^step-(\d{6})\.pt$")
LOG_COLUMNS = ("step", "loss", "instance_loss", "prior_loss", "lr", "grad_norm", "skipped",
               "seconds")


def new_folder(path) -> Path:
    """Make the folder `path`, or path-2, path-3, ... if it exists (mkdir creates or fails)."""
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
    """Every RNG a step may read: the training generator, torch's CPU and CUDA ones, Python's and
    NumPy's; as tensors and plain values, so that torch.load(weights_only=True) reads them back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(), "cuda": cuda,
            "python": random.getstate(),
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
    return sorted(p for p in folder.glob("step-*.pt") if CHECKPOINT.match(p.name))


def save_checkpoint(run: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN.pt atomically; once complete, keep only the newest `keep`."""
    path = Path(run) / "checkpoints" / f"step-{step:06d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if keep > 0:
        for old in list_checkpoints(run)[:-keep]:
            for written in [*old.parent.glob(f"{old.stem}.*"), *old.parent.glob(f"{old.stem}-*")]:
                written.unlink(missing_ok=True)  # step-N.pt, .safetensors, -embeddings.safetensors
    return path


def load_latest_checkpoint(run: Path) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint of a run that loads; a damaged one is skipped with a message."""
    for path in reversed(list_checkpoints(run)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt: fall back to the one before
            print(f"warning: cannot read {path} ({type(e).__name__}: {e}); trying the one before")
    return None, None


# ----------------------------------------------------------------------------- loss log

def write_loss_csv(path: Path, rows: list[dict]) -> None:
    """The whole log, rewritten atomically (a few KB: cheaper to rewrite than to repair)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: timeout, SLURM


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal once its checkpoint is saved (or at once, by a second signal); the
    script exits with 128 + signum, as a process killed by that signal would (130, 143 SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(STOP_SIGNALS.get(signum, f"signal {signum}"))
        self.signum = signum


class StopRequest:
    """Turn the first Ctrl-C or SIGTERM into a request the loop sees at the end of its step (it
    saves a checkpoint and returns); a second one interrupts at once. Under torchrun one key press
    arrives twice, from the terminal and forwarded, a moment apart: a second signal within `grace`
    seconds counts as the same one. A signal the caller ignores (nohup: SIGINT) stays ignored."""

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
