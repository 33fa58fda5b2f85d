"""Changing the adapters a loaded model holds: fold them into the base weights, take them out again, remove one.

No files here: these act on the LoRA layers (minidream/lora.py) of a live model, whatever put the
adapters there (training, or load_lora in lora_files.py). Merging turns W0 x + scaling * B A x into
plain matmuls with W = W0 + scaling * B A (Hu et al. 2021, sec. 4.1: no inference latency); the
layer records each folded scaling in `layer.merged`, so unmerging subtracts exactly what was added.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minidream.lora import LoRALayer, lora_layers, require_adapter


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every LoRA layer of `model` (they stay LoRA layers)."""
    require_adapter(model, name)
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.check_unmerged("remove an adapter")
            for table in (layer.lora_A, layer.lora_B, layer.lora_alpha, layer.lora_scale, layer.lora_dropout):
                del table[name]
            if name in layer.active_adapters:
                layer.active_adapters.remove(name)


@torch.no_grad()
def merge_layer(layer: LoRALayer) -> None:
    """Fold every active adapter into `weight` (W0 + sum scaling * B A); forward then skips them."""
    layer.check_unmerged("merge again")
    for name in layer.active_adapters:
        s = layer.scaling(name)
        layer.weight += (layer.delta_weight(name) * s).to(layer.weight.dtype)
        layer.merged[name] = s


@torch.no_grad()
def unmerge_layer(layer: LoRALayer) -> None:
    """Subtract what merge_layer() added. Exact up to rounding in the weight's dtype (fp32: ~1e-7)."""
    for name, s in layer.merged.items():
        layer.weight -= (layer.delta_weight(name) * s).to(layer.weight.dtype)
    layer.merged = {}


def merge_lora(model: nn.Module) -> None:
    """Fold all active adapters into the base weights (fast sampling: plain matmuls only)."""
    for _, layer in lora_layers(model):
        merge_layer(layer)


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: every LoRA layer of `model` gets its base weight back and runs its adapters again."""
    for _, layer in lora_layers(model):
        unmerge_layer(layer)
