"""train.py's call: the core loop with the method cfg.method names, on every process torchrun started."""

from __future__ import annotations

from pathlib import Path

import minidream.formats  # noqa: F401  (single-file checkpoints)
from minidream.config import TrainConfig, resumed_config
from minidream.methods import method_class
from minidream.parallel import distributed
from minidream.training import train


def run_training(cfg: TrainConfig, dist=None) -> Path:
    """Train as cfg says (a resumed run keeps its saved method); returns the run folder.

    dist: the processes to train on; None joins torchrun's (or runs alone) and leaves them after.
    """
    if cfg.resume:
        cfg = resumed_config(cfg)
    if dist is not None:
        return train(cfg, method_class(cfg.method), dist)
    dist = distributed.setup(cfg.device)
    try:
        return train(cfg, method_class(cfg.method), dist)
    finally:
        distributed.shutdown()
