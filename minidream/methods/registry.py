"""Choosing the method class a run's settings ask for (the table in methods/__init__.py)."""

from minidream.config import METHODS, TrainingError
from minidream.method import LoRA, Method
from minidream.methods.dora_method import DoRA
from minidream.methods.ema import with_ema
from minidream.methods.full_finetune import FullFinetune
from minidream.methods.pivotal import Pivotal
from minidream.methods.textual_inversion import TextualInversion

METHOD_CLASSES = {"lora": LoRA, "full": FullFinetune, "textual-inversion": TextualInversion,
                  "pivotal": Pivotal}
assert tuple(METHOD_CLASSES) == METHODS


def method_class(cfg) -> type[Method]:
    """The class that trains cfg.method, with cfg's variants of it: --dora makes LoRA's layers DoRA
    layers (dora_method.py), --ema-decay makes the result an average of the weights (ema.py)."""
    if cfg.method not in METHOD_CLASSES:
        raise TrainingError(f"unknown training method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    chosen = DoRA if cfg.dora and cfg.method == "lora" else METHOD_CLASSES[cfg.method]
    return with_ema(chosen) if cfg.ema_decay else chosen


def build_method(model, cfg, token: str, class_noun: str) -> Method:
    """Set `model` up for cfg.method (adapters / fp32 weights / new token rows) and return the method."""
    return method_class(cfg)(model, cfg, token, class_noun)
