"""DoRA: LoRA that also learns how long each output channel's weights are. Liu et al. 2024, "DoRA:
Weight-Decomposed Low-Rank Adaptation", eq. (5):

    W' = m * (W0 + s B A) / ||W0 + s B A||_c

W0 is frozen, A and B are LoRA's adapter (minidream/lora.py, s = alpha / r), and m is a trained
vector, one number per output channel, initialised to ||W0||_c so that W' = W0 at first (B = 0).
||.||_c is the norm of each output channel's weights (over in, or in x kh x kw for a conv), as peft
computes it. Sec. 4.3: the norm is treated as a constant (detached), so no gradient flows through
it; this saves its backward pass at little cost in accuracy.

The layer never forms W'. As peft does (for parity), with f = m / ||W0 + s B A||_c (out,):

    y = W0 x + b + (f - 1) W0 x + f s B A x  =  f (W0 x + s B A x) + b

reusing the base output W0 x + b (minus b). With dropout on, peft feeds the dropped-out x to both
adapter terms, so W0 is applied to it a second time. Files: formats/lora_files.py (reading, fused
or stacked through formats/lora_stack.py), methods/dora_file.py (writing).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.lora import (LoRAConv2d, LoRALayer, LoRALinear, inject_lora, lora_layer,
                            mark_only_lora_trainable)
from minidream.quant.linear import LoRAQuantLinear


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c: the norm of each output channel's weights, (out,), for W (out, in[, kh, kw])."""
    return weight.flatten(1).norm(dim=1)


def magnitude_factor(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """f = m / ||W||, so that f * W is eq. 5's W'. The norm, over the dims where `magnitude` has
    size 1, is a constant (sec. 4.3). m (out, 1[, 1, 1]) normalises each output channel (||.||_c
    as peft computes it), m (1, in[, 1, 1]) each input channel (LyCORIS with wd_on_out=False)."""
    dims = tuple(d for d, size in enumerate(magnitude.shape) if size == 1)
    return magnitude / torch.linalg.vector_norm(weight.detach(), dim=dims, keepdim=True)


class DoRALayer(LoRALayer):
    """The adapter of DoRALinear / DoRAConv2d / DoRAQuantLinear: LoRA's A, B, alpha, dropout, and
    `lora_magnitude_vector`, m in peft's shape: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
    (the shape of the output's channel dim, so f scales y directly)."""

    def delta_weight(self) -> torch.Tensor:
        """s B A shaped like W0 (for a conv: B @ A over the flattened kernel)."""
        down, up = self.lora_A.weight, self.lora_B.weight
        return (up.flatten(1) @ down.flatten(1)).view(self.weight.shape) * self.scaling()

    def scaling(self) -> float:
        return self.alpha / self.lora_A.weight.shape[0]

    def dora_factor(self) -> torch.Tensor:
        """f = m / ||W0 + s B A||_c, shaped like m; the norm is a constant (sec. 4.3)."""
        m = self.lora_magnitude_vector
        with torch.no_grad():
            w = self.weight.to(m.dtype) + self.delta_weight().to(m.dtype)  # W0 + s B A
        return magnitude_factor(w, m.view(-1, *[1] * (w.dim() - 1))).view(m.shape)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x without the bias (Linear, QuantLinear: W0 dequantised; Conv2d)."""
        w = self.weight.to(x.dtype)
        return self._conv_forward(x, w, None) if isinstance(self, nn.Conv2d) else F.linear(x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = W0 x + b + (f - 1) W0 x + f s B A x (peft's order of operations)."""
        h = super(LoRALayer, self).forward(x)  # W0 x + b: nn.Linear / nn.Conv2d / QuantLinear
        x = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        if self.training and self.lora_dropout.p > 0:
            x = self.lora_dropout(x)
            w0x = self.base_matmul(x)  # W0 of the dropped-out input, as peft
        else:
            conv = isinstance(self, nn.Conv2d)
            b = self.bias.view(-1, 1, 1) if conv and self.bias is not None else self.bias
            w0x = h if b is None else h - b  # W0 x: the base output less its bias
        f = self.dora_factor()
        return h + ((f - 1) * w0x + f * self.lora_B(self.lora_A(x)) * self.scaling()).to(h.dtype)


class DoRALinear(DoRALayer, LoRALinear):
    """nn.Linear + DoRA."""


class DoRAConv2d(DoRALayer, LoRAConv2d):
    """nn.Conv2d (groups 1) + DoRA: A a conv like the base's, B a 1x1 conv, m (1, out, 1, 1)."""


class DoRAQuantLinear(DoRALayer, LoRAQuantLinear):
    """QuantLinear (minidream/quant: int8/nf4 W0) + DoRA: the norm reads W0 dequantised."""


DORA_CLASS = {LoRALinear: DoRALinear, LoRAConv2d: DoRAConv2d, LoRAQuantLinear: DoRAQuantLinear}


def dora_layer(base, rank: int, alpha: float, dropout=0.0, dtype=torch.float32) -> DoRALayer:
    """Turn `base` (Linear, Conv2d, QuantLinear) into its DoRA subclass in place: a fresh LoRA
    adapter (A random, B = 0) and m = ||W0||_c (peft's ||W0 + s B A||_c with B = 0), in `dtype`."""
    layer = lora_layer(base, rank, alpha, dropout, dtype)  # a LoRA layer first: A, B, alpha
    layer.__class__ = DORA_CLASS[type(layer)]
    with torch.no_grad():
        norm = channel_norm(layer.weight.to(dtype))
    shape = (1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else (-1,)
    layer.lora_magnitude_vector = nn.Parameter(norm.view(shape))
    return layer


def inject_dora(model: nn.Module, targets, *, rank: int = 4, alpha: float | None = None,
                dropout: float = 0.0, dtype=torch.float32) -> list[str]:
    """Make each module matched by `targets` (as lora.inject_lora) a DoRA layer; returns their
    names. alpha defaults to rank (s = 1)."""
    return inject_lora(model, targets, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype,
                       make_layer=dora_layer)


def dora_layers(model: nn.Module) -> list[tuple[str, DoRALayer]]:  # (module name, layer) pairs
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoRALayer)]


def dora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer trains: A, B and m of every DoRA layer."""
    return [p for _, m in dora_layers(model)
            for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector)]


def mark_only_dora_trainable(model: nn.Module) -> None:  # requires_grad on A, B, m only
    mark_only_lora_trainable(model, dora_parameters)


def dora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's keys: <module>.lora_A.weight, .lora_B.weight and .lora_magnitude_vector."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_dora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a dora_state_dict (a checkpoint's) back into a model with the same DoRA layers."""
    want = dora_state_dict(model).keys()
    missing, unexpected = sorted(want - state.keys()), sorted(state.keys() - want)
    if missing or unexpected:
        raise ValueError(f"DoRA state does not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (another --lora-targets or rank?)")
    model.load_state_dict(state, strict=False)
