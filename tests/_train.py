"""training.train as train.py calls it: a resumed run's own settings, the method cfg.method names,
model paths of any kind (minidream.formats); then, on rank 0, the runs/<subject>-latest link. And a
run stopped by Ctrl-C, then resumed."""

import signal
from pathlib import Path

import pytest

from minidream import formats, training
from minidream.cli.args import resumed_config
from minidream.config import LORA_FILE, TrainConfig
from minidream.runs import Stopped
from minidream.methods.registry import method_class
from minidream.cli.latest_link import link_latest


def train_like_cli(cfg, dist=None):
    cfg = resumed_config(cfg) if cfg.resume else cfg
    run = training.train(cfg, method_class(cfg), dist, models=formats)
    if dist is None or dist.is_main:
        link_latest(run, Path(cfg.subject).name)
    return run


def interrupted_then_resumed(cfg: TrainConfig, monkeypatch, stop_in_step: int = 3) -> Path:
    """The run `cfg` describes, stopped by Ctrl-C during step `stop_in_step` (its checkpoint
    written), then resumed from that checkpoint as `train.py --resume RUN` does."""
    real_apply, calls = training.apply_gradients, []

    def apply_then_signal(*args, **kw):
        calls.append(1)
        if len(calls) == stop_in_step:
            signal.raise_signal(signal.SIGINT)
        return real_apply(*args, **kw)

    monkeypatch.setattr(training, "apply_gradients", apply_then_signal)
    with pytest.raises(Stopped):
        train_like_cli(cfg)
    monkeypatch.setattr(training, "apply_gradients", real_apply)
    (run,) = Path(cfg.out).glob("raj-2*")
    assert not (run / LORA_FILE).exists()  # stopped: no result yet
    assert len((run / "loss.csv").read_text().splitlines()) == 1 + stop_in_step  # header + its steps
    return train_like_cli(TrainConfig(resume=str(run)))
