"""Which parameters a training method trains, counted without tensor values (for the memory planner)."""

from __future__ import annotations

from dataclasses import dataclass

from minidream.method import text_encoders
from minidream.methods import build_method
from minidream.optim import optimizer_state_bytes


@dataclass
class ParameterPlan:
    """Which parameters a method trains, for memory estimates (no tensor values needed)."""

    trained: int  # parameters updated by the optimizer: fp32 weights, fp32 gradients
    frozen: int  # every other parameter of the UNet and text encoders, in the weight dtype
    optimizer: str  # "adamw8bit" | "adamw"
    optimizer_state_bytes: int  # Adam's two moments for the trained parameters


def parameter_plan(model, cfg, token: str = "sks", class_noun: str = "person") -> ParameterPlan:
    """Build cfg.method on `model` (a meta-device model works) and count what trains.

    For the memory planner: weights = trained * 4 + frozen * bytes(weight dtype), gradients =
    trained * 4, optimizer state = optimizer_state_bytes; activations come from running
    step.training_step on fake tensors.
    """
    method = build_method(model, cfg, token, class_noun)
    trained = method.parameters()
    ids = {id(p) for p in trained}
    modules = [model.unet, *text_encoders(model.text).values()]
    frozen = sum(p.numel() for m in modules for p in m.parameters() if id(p) not in ids)
    return ParameterPlan(sum(p.numel() for p in trained), frozen, cfg.optimizer,
                         optimizer_state_bytes(trained, cfg.optimizer))
