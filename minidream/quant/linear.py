"""A frozen Linear whose weight is stored quantised and dequantised inside forward, layer by layer:
only the running layer's W exists in the compute dtype (QLoRA, Dettmers et al. 2023, eq. 5:
Y = X doubleDequant(c, W_nf4) + X L1 L2, the LoRA term added by minidream/lora.py unchanged).

The weight is a function of two buffers (codes, scales), read through the `weight` property, so
code that reads layer.weight (LoRA's init, merging checks) sees W. forward does not call
F.linear(x, self.weight) but QuantMatmul, which keeps the codes, not W, for the backward pass:
dL/dx = dL/dy W needs W again, so it is dequantised again there (W itself gets no gradient).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.lora import LoRALayer
from minidream.quant.int8 import dequantise_int8, quantise_int8
from minidream.quant.nf4 import dequantise_nf4, quantise_nf4

QUANTISE = {"int8": quantise_int8, "nf4": quantise_nf4}


class QuantMatmul(torch.autograd.Function):
    """y = x W^T + b with W = layer.weight dequantised in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.weight, layer.bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.weight  # (out, in), dequantised once more
        return (grad @ w.to(grad.dtype)).to(ctx.x_dtype), None  # dL/dx (..., in); none for layer


class QuantLinear(nn.Linear):
    """An nn.Linear (frozen) holding `weight_codes` and `weight_scales` instead of `weight`."""

    def weight_format(self) -> str:
        return "nf4" if self.weight_codes.dtype == torch.uint8 else "int8"

    @property
    def weight(self) -> torch.Tensor:
        """W (out, in) in the scales' dtype: the weight dtype of the unquantised model."""
        if self.weight_format() == "int8":
            return dequantise_int8(self.weight_codes, self.weight_scales)
        return dequantise_nf4(self.weight_codes, self.weight_scales, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantMatmul.apply(x, self)


class LoRAQuantLinear(LoRALayer, QuantLinear):
    """QuantLinear + LoRA: minidream.lora.lora_layer picks it through QuantLinear.lora_class."""


QuantLinear.lora_class = LoRAQuantLinear


def quantise_linear(layer: nn.Linear, weight: torch.Tensor, fmt: str, dtype=None) -> QuantLinear:
    """Make `layer` a QuantLinear in place, holding `weight` (out, in) cast to `dtype` (default its
    own) in format `fmt` (int8 or nf4); scales in that dtype, on weight's device. Any old `weight`
    Parameter is dropped."""
    codes, scales = QUANTISE[fmt](weight.detach(), dtype)
    layer._parameters.pop("weight", None)
    layer.__class__ = QuantLinear
    layer.weight_shape = tuple(weight.shape)
    layer.register_buffer("weight_codes", codes)
    layer.register_buffer("weight_scales", scales)
    return layer


def quantiser(fmt: str):
    """What load_weights calls with each Linear, its weight as read and the load dtype: None for
    "fp16" (the model's own weight dtype, nothing quantised), else a function quantising to `fmt`."""
    if fmt == "fp16":
        return None
    if fmt not in QUANTISE:
        raise ValueError(f"unknown base weights {fmt!r}: use fp16, int8 or nf4")
    return lambda layer, weight, dtype: quantise_linear(layer, weight, fmt, dtype)


def quantise_model(model: nn.Module, fmt: str) -> nn.Module:
    """Quantise every nn.Linear of an already built `model` in place, as load_weights does while it
    reads with quantise=quantiser(fmt) ("fp16": nothing). For models made without reading a file:
    the planner's UNet on meta, the benchmarks' random UNets. Returns the model."""
    quantise = quantiser(fmt)
    for layer in [m for m in model.modules() if isinstance(m, nn.Linear)] if quantise else []:
        quantise(layer, layer.weight, layer.weight.dtype)
    return model


def quantised_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (codes and scales included)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
