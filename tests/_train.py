"""training.train as train.py calls it: a resumed run's own settings, the method cfg.method names,
model paths of any kind (minidream.formats)."""

from minidream import formats, training
from minidream.cli.args import resumed_config
from minidream.methods import method_class


def train_like_cli(cfg, dist=None):
    cfg = resumed_config(cfg) if cfg.resume else cfg
    return training.train(cfg, method_class(cfg.method), dist, models=formats)
