"""LoRA: a low-rank adapter on a frozen Linear or Conv2d layer. Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", eq. (3): h = W0 x + B A x, W0 frozen, only A (r x in, "down")
and B (out x r, "up") trained, B A x scaled by alpha / r (sec. 4.1). As in loralib, the layers
subclass nn.Linear / nn.Conv2d: the base keys (weight, bias) stay, the adapter adds diffusers' file
keys `<module>.lora_A.weight`, `.lora_B.weight`. Several named adapters: formats/lora_stack.py."""

import torch
import torch.nn as nn

# Module-name targets. A target matches a module whose dotted name equals it or ends with
# "." + target: the same rule as a list of peft `target_modules`, so parameter counts agree.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # what diffusers' SDXL DreamBooth LoRA trains
UNET_FEEDFORWARD = ("ff.net.0.proj", "ff.net.2")  # GEGLU input projection and output Linear
UNET_PROJ = ("proj_in", "proj_out")  # the transformer's in/out projections (Linear in SDXL)
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # LoCon
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # transformers' CLIP attention
TARGET_GROUPS = {"attn": UNET_ATTENTION, "ff": UNET_FEEDFORWARD, "proj": UNET_PROJ,
                 "conv": UNET_CONV, "text": TEXT_ATTENTION}
UNET_TARGET_GROUPS = tuple(g for g in TARGET_GROUPS if g != "text")  # what --lora-targets may name


def unet_targets(groups: str) -> tuple[str, ...]:
    """Module-name targets of comma-separated UNet groups: "attn,ff" -> UNET_ATTENTION + ..."""
    names = [g.strip() for g in groups.split(",")]
    unknown = [g for g in names if g not in UNET_TARGET_GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; use a comma-separated list of "
                         f"{', '.join(UNET_TARGET_GROUPS)} (e.g. attn,ff)")
    return tuple(t for g in names for t in TARGET_GROUPS[g])


def down_up(base: nn.Module, rank: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A and B for `base`: A ~ kaiming_uniform(a=sqrt(5)) (nn's default, as in peft), B = 0."""
    kw = dict(bias=False, device=base.weight.device, dtype=dtype)
    if isinstance(base, nn.Linear):  # A (r, in), B (out, r); skip_init: B takes no random draw
        down = nn.Linear(base.in_features, rank, **kw)
        up = nn.utils.skip_init(nn.Linear, rank, base.out_features, **kw)
    elif isinstance(base, nn.Conv2d) and base.groups == 1 and base.padding_mode == "zeros":
        # A: a conv like the base's, (r, in, kh, kw); B: a 1x1 conv, (out, r, 1, 1) (kohya's conv
        # LoRA). Together one conv whose kernel is B @ A over the flattened kernel.
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                         base.dilation, **kw)
        up = nn.utils.skip_init(nn.Conv2d, rank, base.out_channels, 1, **kw)
    else:
        raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d (groups=1, zero padding): {base}")
    nn.init.zeros_(up.weight)  # B A = 0: the adapted model starts as the base model
    return down, up


class LoRALayer:
    """The adapter of LoRALinear and LoRAConv2d (the nn.Linear / nn.Conv2d after it owns W0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + (alpha / r) B A x (eq. 3), with dropout on the LoRA input while training."""
        h = super().forward(x)  # W0 x (+ bias): nn.Linear / nn.Conv2d
        # Under autocast the matmuls choose their own dtype: casting x to the fp32 adapter first
        # would only be cast straight back (two copies of x, the same numbers).
        x = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        bax = self.lora_B(self.lora_A(self.lora_dropout(x)))
        s = self.alpha / self.lora_A.weight.shape[0]
        return h + (bax if s == 1 else bax * s).to(h.dtype)  # alpha = r (the default): no pass


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear + LoRA: y = x W0^T + b + (alpha / r) x A^T B^T."""


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """nn.Conv2d + LoRA: A a conv like the base's, B a 1x1 conv."""


def lora_layer(base, rank: int, alpha: float, dropout=0.0, dtype=torch.float32) -> LoRALayer:
    """Turn `base` into its LoRA subclass in place, with a fresh adapter (A, B in `dtype`)."""
    base.lora_A, base.lora_B = down_up(base, rank, dtype)
    # The same object keeps its own weight/bias Parameters (no copy) and so its state-dict keys.
    # A layer whose W0 x is its own (minidream/quant: a dequantised W0) names its LoRA subclass.
    lora_class = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
    base.__class__ = getattr(base, "lora_class", lora_class)
    base.alpha, base.lora_dropout = float(alpha), nn.Dropout(dropout)
    return base


# ----------------------------------------------------------------------------------------------
# Injection: find target modules by name and make them LoRA layers in place


def matches(name, targets) -> bool: return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the Linear/Conv2d modules matched by `targets`; each target must match one."""
    if isinstance(targets, str):
        targets = TARGET_GROUPS[targets] if targets in TARGET_GROUPS else (targets,)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and matches(n, targets)]
    unused = [t for t in targets if not any(matches(n, (t,)) for n in names)]
    if unused:
        raise ValueError(f"LoRA target(s) {unused} match no Linear/Conv2d module of "
                         f"{type(model).__name__}; check the spelling (targets are name suffixes)")
    return names


def inject_lora(model: nn.Module, targets=UNET_ATTENTION, *, rank: int = 4,
                alpha: float | None = None, dropout: float = 0.0, dtype=torch.float32,
                make_layer=lora_layer) -> list[str]:
    """Give each module matched by `targets` (name suffixes or a TARGET_GROUPS key) a fresh adapter;
    returns their names. alpha defaults to rank (scaling 1, diffusers' convention). make_layer: a
    LoRA variant's lora_layer (methods/dora.py)."""
    names, alpha = find_targets(model, targets), rank if alpha is None else alpha
    for name in names:
        if isinstance(model.get_submodule(name), LoRALayer):
            raise ValueError(f"{name} already has a LoRA adapter (one per layer)")
        make_layer(model.get_submodule(name), rank, alpha, dropout, dtype)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:  # (module name, layer) pairs
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


# ----------------------------------------------------------------------------------------------
# Training helpers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:  # what a checkpoint keeps
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}  # <module>.lora_A.weight


def mark_only_lora_trainable(model: nn.Module, trained=lora_parameters) -> None:
    """requires_grad on the adapters' parameters only (`trained`: which; DoRA's adds m)."""
    model.requires_grad_(False)
    for p in trained(model):
        p.requires_grad_(True)
