"""Several named LoRA adapters on one layer, each with its own strength: sample.py's LoRA files.

A run trains one adapter per layer (minidream/lora.py). Applying LoRA files stacks them instead:
a layer holds adapters by name, in peft's layout (`<module>.lora_A.<name>.weight`), and computes

    h = W0 x + sum_k scale_k * (alpha_k / r_k) * B_k A_k x

Merging folds the sum into W = W0 + sum_k ... B_k A_k (Hu et al. 2021, sec. 4.1: no inference
latency); the layer records each folded scaling in `merged`, so unmerging subtracts exactly what
was added. Adapters come from files through lora_weights.load_adapter_weights.

A DoRA adapter (methods/dora.py) also holds a magnitude m. As peft does, adapters apply in order,
a DoRA one as W <- f (W + s B A) with f = m / ||W0 + s B A|| computed from W0 alone; a layer with
an active DoRA adapter runs that adapted weight unmerged, and merging stores each f to undo it.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.lora import down_up
from minidream.methods.dora import magnitude_factor
from minidream.quant.linear import QuantLinear


class LoRAStack:
    """Named adapters on the nn.Linear / nn.Conv2d after this class in StackLinear / StackConv2d."""

    def add_adapter(self, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
                    scale: float = 1.0, dtype: torch.dtype = torch.float32, magnitude=None) -> None:
        """Add adapter `name`: A = down (r, in[, kh, kw]), B = up (out, r[, 1, 1]), in `dtype`;
        a DoRA adapter's m (out, 1[, 1, 1]) or (1, in[, 1, 1]): see magnitude_factor."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"adapter name {name!r} must be an identifier (letters, digits, _)")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; remove it first")
        self.check_unmerged("add an adapter")
        self.lora_A[name], self.lora_B[name] = down_up(self, down.shape[0], dtype)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(down)
            self.lora_B[name].weight.copy_(up)
        self.alpha[name], self.scale[name] = float(alpha), float(scale)
        if magnitude is not None:
            m = magnitude.to(self.weight.device, dtype)
            self.lora_magnitude_vector[name] = nn.Parameter(m, requires_grad=False)
        self.active.append(name)

    def scaling(self, name: str) -> float:
        """scale * alpha / r: the user's strength times the factor in front of B A."""
        return self.scale[name] * self.alpha[name] / self.lora_A[name].weight.shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's unscaled B A, shaped like `weight` (computed in the adapter's dtype)."""
        down, up = self.lora_A[name].weight, self.lora_B[name].weight
        # A conv followed by a 1x1 conv is one conv whose kernel is B @ A over the flattened kernel.
        return (up.flatten(1) @ down.flatten(1)).view(self.weight.shape)

    def dora_factors(self) -> dict[str, torch.Tensor]:
        """f = m / ||W0 + s B A|| of each active DoRA adapter, from W0 (in fp32 or wider)."""
        names = [name for name in self.active if name in self.lora_magnitude_vector]
        w0 = self.wide_weight() if names else None
        return {name: magnitude_factor(w0 + self.delta_weight(name) * self.scaling(name),
                                       self.lora_magnitude_vector[name]) for name in names}

    def wide_weight(self) -> torch.Tensor:  # W0 in fp32 (fp64 stays), for DoRA's norms
        return self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))

    def adapted_weight(self, factors: dict) -> torch.Tensor:
        """W0 with the active adapters applied in order (peft's): W + s B A; DoRA f (W + s B A)."""
        w = self.wide_weight()
        for name in self.active:
            w = w + self.delta_weight(name).to(w.dtype) * self.scaling(name)
            w = factors[name] * w if name in factors else w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = {} if self.merged else self.dora_factors()
        if factors:  # DoRA, unmerged (a quantised W0): run the adapted weight
            w = self.adapted_weight(factors).to(x.dtype)
            if isinstance(self, nn.Conv2d):
                return self._conv_forward(x, w, self.bias)
            return F.linear(x, w, self.bias)
        out = super().forward(x)  # W0 x (+ bias): nn.Linear / nn.Conv2d
        if self.merged:
            return out  # the active adapters are already inside self.weight
        for name in self.active:
            down = self.lora_A[name]
            h = x if torch.is_autocast_enabled(x.device.type) else x.to(down.weight.dtype)
            out = out + (self.lora_B[name](down(h)) * self.scaling(name)).to(out.dtype)
        return out

    def check_unmerged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {action} while adapters are merged: unmerge_lora() first")


class StackLinear(LoRAStack, nn.Linear):
    pass


class StackConv2d(LoRAStack, nn.Conv2d):
    pass


class StackQuantLinear(LoRAStack, QuantLinear):
    """Adapters on a quantised frozen Linear (minidream/quant): they run unmerged, W0 stays 4/8-bit."""


def stack_layer(module: nn.Module) -> LoRAStack:
    """`module` (an nn.Linear / nn.Conv2d) made a LoRAStack in place (its weight, bias and keys
    stay), with no adapter yet; a LoRAStack is returned as it is."""
    if not isinstance(module, LoRAStack):
        linear = StackQuantLinear if isinstance(module, QuantLinear) else StackLinear
        module.__class__ = StackConv2d if isinstance(module, nn.Conv2d) else linear
        module.lora_A, module.lora_B = nn.ModuleDict(), nn.ModuleDict()  # name -> A, name -> B
        module.alpha, module.scale = {}, {}  # name -> alpha; name -> user strength (0.8: weaker)
        module.active, module.merged = [], {}  # names that run; name -> scaling folded into weight
        module.lora_magnitude_vector = nn.ParameterDict()  # name -> DoRA's m
        module.merged_factors = {}  # name -> DoRA factor f folded into weight
    return module


def stack_layers(model: nn.Module) -> list[tuple[str, LoRAStack]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAStack)]


def adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(a for _, layer in stack_layers(model) for a in layer.lora_A))


def require_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; loaded adapters: {adapter_names(model)}")


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer of `model` (they stay LoRAStack layers)."""
    require_adapter(model, name)
    for _, layer in stack_layers(model):
        if name in layer.lora_A:
            layer.check_unmerged("remove an adapter")
            for table in (layer.lora_A, layer.lora_B, layer.alpha, layer.scale):
                del table[name]
            if name in layer.lora_magnitude_vector:
                del layer.lora_magnitude_vector[name]
            if name in layer.active:
                layer.active.remove(name)


@torch.no_grad()
def merge_layer(layer: LoRAStack) -> None:
    """Fold every active adapter into `weight` (W0 + sum scaling * B A); forward then skips them."""
    layer.check_unmerged("merge again")
    if isinstance(layer, QuantLinear):
        raise ValueError("cannot merge adapters into a quantised weight (int8/nf4): keep them unmerged")
    factors = layer.dora_factors()  # from W0, before anything is merged
    if factors:  # DoRA: the weight becomes the adapted weight (all active adapters, in order)
        layer.weight.copy_(layer.adapted_weight(factors))
    for name in layer.active:
        s = layer.scaling(name)
        if not factors:
            layer.weight += (layer.delta_weight(name) * s).to(layer.weight.dtype)
        layer.merged[name] = s
    layer.merged_factors = factors


@torch.no_grad()
def unmerge_layer(layer: LoRAStack) -> None:
    """Subtract what merge_layer() added (divide by each DoRA factor, last adapter first):
    exact up to rounding in the weight's dtype."""
    for name, s in reversed(layer.merged.items()):
        f = layer.merged_factors.get(name)
        w = layer.weight if f is None else layer.weight / f
        layer.weight.copy_(w - (layer.delta_weight(name) * s).to(layer.weight.dtype))
    layer.merged, layer.merged_factors = {}, {}


def merge_lora(model: nn.Module) -> None:
    """Fold all active adapters into the base weights (fast sampling: plain matmuls only)."""
    for _, layer in stack_layers(model):
        merge_layer(layer)


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: each layer gets its base weight back and runs its adapters again."""
    for _, layer in stack_layers(model):
        unmerge_layer(layer)
