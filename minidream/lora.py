"""LoRA: low-rank adapters on frozen Linear and Conv2d layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3): h = W0 x + B A x, with W0 frozen
and only A (r x in, "down") and B (out x r, "up") trained. A layer may carry several named adapters. As in loralib,
the layers subclass nn.Linear / nn.Conv2d and keep the base `weight`/`bias`, so base keys do not change; adapters
add `<module>.lora_A.<name>` and `.lora_B.<name>`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Module-name targets. A target matches a module whose dotted name equals it or ends with
# "." + target: the same rule as a list of peft `target_modules`, so parameter counts agree.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # what diffusers' SDXL DreamBooth LoRA trains
UNET_FEEDFORWARD = ("ff.net.0.proj", "ff.net.2")  # GEGLU input projection and output Linear
UNET_PROJ = ("proj_in", "proj_out")  # the transformer's in/out projections (Linear in SDXL)
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # kohya "LoCon"
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # transformers' CLIP attention
TARGET_GROUPS = {"attn": UNET_ATTENTION, "ff": UNET_FEEDFORWARD, "proj": UNET_PROJ, "conv": UNET_CONV,
                 "text": TEXT_ATTENTION}
UNET_TARGET_GROUPS = tuple(g for g in TARGET_GROUPS if g != "text")  # what train.py --lora-targets may name


def unet_targets(groups: str) -> tuple[str, ...]:
    """Module-name targets of comma-separated UNet groups: "attn,ff" -> UNET_ATTENTION + UNET_FEEDFORWARD."""
    names = [g.strip() for g in groups.split(",")]
    unknown = [g for g in names if g not in UNET_TARGET_GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; use a comma-separated list of "
                         f"{', '.join(UNET_TARGET_GROUPS)} (e.g. attn,ff)")
    return tuple(t for g in names for t in TARGET_GROUPS[g])


@dataclass
class LoRAWeights:
    """One module's adapter, the unit files hold: delta W = up @ down * alpha / rank."""

    down: torch.Tensor  # A: (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up: torch.Tensor  # B: (out, r) for Linear, (out, r, 1, 1) for Conv2d
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# ----------------------------------------------------------------------------------------------
# The layers


class LoRALayer:
    """Adapters and forward shared by LoRALinear and LoRAConv2d (the nn class after it owns weight/bias)."""

    def _adopt(self, base: nn.Module):
        """Take over the base layer's own weight/bias Parameters (no copy) and train/eval mode; no adapters yet."""
        self.weight, self.bias = base.weight, base.bias
        self.train(base.training)
        self.lora_A = nn.ParameterDict()  # name -> down weight
        self.lora_B = nn.ParameterDict()  # name -> up weight
        self.lora_alpha: dict[str, float] = {}
        self.lora_scale: dict[str, float] = {}  # user strength, e.g. 0.8 for a style LoRA
        self.lora_dropout: dict[str, float] = {}  # dropout probability on the adapter's input
        self.active_adapters: list[str] = []
        self.merged: dict[str, float] = {}  # name -> scaling folded into weight (formats.lora_merge.merge_lora)
        return self

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    scale: float = 1.0, dtype: torch.dtype = torch.float32) -> None:
        """Add adapter `name`, initialised as peft does: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default,
        U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B = 0, so the delta is exactly zero until B is trained."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"adapter name {name!r} must be a Python identifier (letters, digits, _)")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; remove it first")
        self.check_unmerged("add an adapter")
        out_features, *in_shape = self.weight.shape  # Linear (out, in); Conv2d (out, in, kh, kw)
        down = torch.empty((rank, *in_shape), device=self.weight.device, dtype=dtype)  # A: (r, in[, kh, kw])
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        up_shape = (out_features, rank, *[1] * (len(in_shape) - 1))  # B: (out, r[, 1, 1])
        self.lora_A[name] = nn.Parameter(down)
        self.lora_B[name] = nn.Parameter(torch.zeros(up_shape, device=self.weight.device, dtype=dtype))
        self.lora_alpha[name], self.lora_scale[name] = float(alpha), float(scale)
        self.lora_dropout[name] = float(dropout)
        self.active_adapters.append(name)

    def scaling(self, name: str) -> float:
        """scale * alpha / r: the factor in front of B A (paper section 4.1, times user strength)."""
        return self.lora_scale[name] * self.lora_alpha[name] / self.lora_A[name].shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's unscaled B A, shaped like `weight` (computed in the adapter's dtype)."""
        down, up = self.lora_A[name], self.lora_B[name]
        # A conv followed by a 1x1 conv is one conv whose kernel is B @ A over the flattened kernel.
        return (up.flatten(1) @ down.flatten(1)).view(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output + sum over active adapters of scaling * B(A(dropout(x)))."""
        out = super().forward(x)  # nn.Linear / nn.Conv2d: the next class in the subclass's bases
        if self.merged:
            return out  # the active adapters are already inside self.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        for name in self.active_adapters:
            down, up = self.lora_A[name], self.lora_B[name]
            # Under autocast the matmuls choose their own dtype: casting x to the fp32 adapter first
            # would only be cast straight back (two copies of x, the same numbers).
            h = F.dropout(x if autocast else x.to(down.dtype), self.lora_dropout[name], self.training)
            delta, s = self._lora_path(h, down, up), self.scaling(name)
            if s != 1.0:  # alpha = rank, the default, gives 1: no pass over the output for it
                delta = delta * s
            out = out + delta.to(out.dtype)
        return out

    def check_unmerged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {action} while adapters are merged; call unmerge_lora() first")


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear + LoRA adapters: y = x W0^T + b + sum_k s_k * x A_k^T B_k^T (eq. 3)."""

    @classmethod
    def wrap(cls, base: nn.Linear) -> "LoRALinear":
        # Built on the meta device so nothing is allocated, then given the base's own Parameters.
        return cls(base.in_features, base.out_features, base.bias is not None, device="meta")._adopt(base)

    def _lora_path(self, h, down, up):
        return F.linear(F.linear(h, down), up)  # (..., in) -> (..., r) -> (..., out)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """nn.Conv2d + LoRA: A is a conv with the base kernel/stride/padding, B a 1x1 conv (kohya's conv LoRA)."""

    @classmethod
    def wrap(cls, base: nn.Conv2d) -> "LoRAConv2d":
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRA conv needs groups=1 and zero padding "
                             f"(got groups={base.groups}, padding_mode={base.padding_mode!r})")
        return cls(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                   base.dilation, bias=base.bias is not None, device="meta")._adopt(base)

    def _lora_path(self, h, down, up):
        h = F.conv2d(h, down, None, self.stride, self.padding, self.dilation)  # (B, r, H', W')
        return F.conv2d(h, up)  # (B, out, H', W')


# ----------------------------------------------------------------------------------------------
# Injection: find target modules by name and swap them for LoRA layers in place


def matches(module_name: str, targets) -> bool:
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the Linear/Conv2d modules matched by `targets`; every target must match something."""
    if isinstance(targets, str):
        targets = TARGET_GROUPS[targets] if targets in TARGET_GROUPS else (targets,)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and matches(n, targets)]
    unused = [t for t in targets if not any(matches(n, (t,)) for n in names)]
    if unused:
        raise ValueError(f"LoRA target(s) {unused} match no Linear/Conv2d module of "
                         f"{type(model).__name__}; check the spelling (targets are module-name suffixes)")
    return names


def wrap_module(model: nn.Module, name: str) -> LoRALayer:
    """Replace the Linear/Conv2d called `name` by its LoRA version (returns it if already one)."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALayer):
        return module
    if isinstance(module, nn.Linear):
        layer = LoRALinear.wrap(module)
    elif isinstance(module, nn.Conv2d):
        layer = LoRAConv2d.wrap(module)
    else:
        raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, but {name} is {type(module).__name__}")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def inject_lora(model: nn.Module, targets=UNET_ATTENTION, *, name: str = "default", rank: int = 4,
                alpha: float | None = None, dropout: float = 0.0, scale: float = 1.0,
                dtype: torch.dtype = torch.float32) -> list[str]:
    """Add a fresh adapter `name` to every module matched by `targets` (module-name suffixes or a
    TARGET_GROUPS key); returns their names. alpha defaults to rank (scaling 1, diffusers' convention)."""
    names = find_targets(model, targets)
    for module_name in names:
        wrap_module(model, module_name).add_adapter(name, rank, rank if alpha is None else alpha, dropout, scale, dtype)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(name for _, layer in lora_layers(model) for name in layer.lora_A))  # in order, once


def require_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; loaded adapters: {adapter_names(model)}")


# ----------------------------------------------------------------------------------------------
# Training helpers


def is_lora_parameter(param_name: str, adapter: str | None = None) -> bool:
    parts = param_name.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and adapter in (None, parts[-1])


def mark_only_lora_trainable(model: nn.Module, adapter: str | None = None) -> None:
    """requires_grad on the LoRA parameters (of `adapter`, or all) and off everywhere else."""
    for param_name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(param_name, adapter))


def lora_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_lora_parameter(n, adapter)]


def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA entries of model.state_dict() (`<module>.lora_A.<name>`), e.g. for checkpoints."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k, adapter)}
