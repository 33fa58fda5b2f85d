"""training.train as train.py calls it: a resumed run's own settings, the method cfg.method names,
model paths of any kind (minidream.formats); then, on rank 0, the runs/<subject>-latest link."""

from pathlib import Path

from minidream import formats, training
from minidream.cli.args import resumed_config
from minidream.methods.registry import method_class
from minidream.cli.latest_link import link_latest


def train_like_cli(cfg, dist=None):
    cfg = resumed_config(cfg) if cfg.resume else cfg
    run = training.train(cfg, method_class(cfg), dist, models=formats)
    if dist is None or dist.is_main:
        link_latest(run, Path(cfg.subject).name)
    return run
