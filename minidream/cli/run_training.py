"""train.py's call: the core loop with the method cfg.method names, on every process torchrun started;
then <out>/<subject>-latest points at the finished run, and a toy-world result is scored (toy/run_score.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import minidream.formats  # noqa: F401  (single-file checkpoints)
from minidream.config import TrainConfig, resumed_config
from minidream.formats.archives import unpack_class_images
from minidream.methods import method_class
from minidream.parallel import distributed
from minidream.toy.run_score import score_run
from minidream.training import train


def run_training(cfg: TrainConfig, dist=None) -> Path:
    """Train as cfg says (a resumed run keeps its saved method); returns the finished run's folder.
    A run stopped by Ctrl-C raises KeyboardInterrupt once its checkpoint is saved.

    dist: the processes to train on; None joins torchrun's (or runs alone) and leaves them after.
    """
    if cfg.resume:
        cfg = resumed_config(cfg)
    if cfg.class_dir and Path(cfg.class_dir).suffix.lower() == ".zip":
        cfg = replace(cfg, class_dir=str(unpack_class_images(cfg.class_dir)))
    if dist is not None:
        run = train(cfg, method_class(cfg.method), dist)
    else:
        dist = distributed.setup(cfg.device)
        try:
            run = train(cfg, method_class(cfg.method), dist)
        finally:
            distributed.shutdown()
    if dist.is_main:
        link_latest(run, Path(cfg.subject).name)
        if cfg.score:
            score_run(run)
    return run


def link_latest(run: Path, subject_name: str) -> Path | None:
    """Point <out>/<subject>-latest at this finished run (a relative symlink, replaced atomically), so that
    `python sample.py --lora runs/raj-latest` always uses the newest result."""
    run = run.resolve()  # the real folder, never a link to it (resuming through the link itself)
    link = run.parent / f"{subject_name}-latest"
    if run.name == link.name:
        print(f"note: {link} is a run folder itself, not a link; it is left as it is")
        return None
    tmp = run.parent / f".{link.name}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:  # a file system without symlinks, or a real folder of that name
        tmp.unlink(missing_ok=True)
        print(f"note: {link} does not point at this run ({e.strerror or e}); use the run folder itself")
        return None
    print(f"latest run: {link} -> {run.name}")
    return link
