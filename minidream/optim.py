"""Optimizer (AdamW8bit or AdamW), learning-rate schedule and mixed precision for training.

fp16 needs a GradScaler (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2): gradients
through fp16 activations underflow below ~6e-8, so the loss is multiplied by S (2^16 at first) and
the gradients divided by S before clipping. bf16/fp32 get a disabled one (one code path)."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch

from minidream.config import LR_SCHEDULES, OPTIMIZERS, PRECISIONS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes AdamW8bit keeps smaller tensors' moments in fp32


def _check(kind: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}: choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(param_groups, name: str = "adamw8bit", *, lr: float, betas=(0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 1e-4):
    """(optimizer, name actually used). AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via
    Block-wise Quantization") keeps Adam's moments in 8 bits, the 16 GB T4 recipe; torch AdamW
    (Loshchilov & Hutter 2019) is the fallback when bitsandbytes cannot run here."""
    _check("optimizer", name, OPTIMIZERS)
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        problem = _bitsandbytes_problem(param_groups)
        if problem is None:
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(param_groups, **hyper), "adamw8bit"
        warnings.warn(f"bitsandbytes AdamW8bit cannot run here ({problem}); using torch.optim.AdamW"
                      " instead (same algorithm, 32-bit states: 4x the optimizer-state memory)")
    return torch.optim.AdamW(param_groups, **hyper), "adamw"


def _bitsandbytes_problem(param_groups) -> str | None:
    """None if AdamW8bit works on the parameters' device, else why not. Importing is not enough (an
    unsupported build imports fine and fails at the first step): one step is taken on a probe."""
    device = param_groups[0]["params"][0].device
    # bitsandbytes logs a harmless warning about optional CPU kernels at import; keep stdout clean.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes

        probe = torch.nn.Parameter(torch.zeros(BNB_MIN_8BIT_SIZE, device=device))
        probe.grad = torch.ones_like(probe)
        bitsandbytes.optim.AdamW8bit([probe], lr=1e-3).step()
        if not torch.isfinite(probe).all():
            return "its test step produced NaN"
    except Exception as e:  # ImportError, missing CUDA libraries, unsupported device, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


# ----------------------------------------------------------------------------- learning rate

def lr_at(step: int, lr: float, schedule="constant", warmup_steps=0, total_steps=1) -> float:
    """Learning rate for optimizer step `step` (0-based).

    constant              lr throughout (warmup_steps ignored)
    constant_with_warmup  linear ramp lr/warmup, 2 lr/warmup, ..., lr over the first warmup_steps
    cosine                the same ramp, then half a cosine from lr down to 0 at total_steps
                          (Loshchilov & Hutter 2017, "SGDR", eq. 5 with one cycle and no restart)"""
    _check("lr schedule", schedule, LR_SCHEDULES)
    if schedule != "constant" and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule != "cosine":
        return lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, step: int, base_lrs, schedule: str, warmup_steps: int, total_steps: int):
    """Write lr_at(step) into every parameter group (each group scales its own base lr)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr_at(step, base, schedule, warmup_steps, total_steps)


# ----------------------------------------------------------------------------- precision

@dataclass
class Precision:
    """How training runs numerically on one device."""

    name: str  # "fp16" | "bf16" | "fp32": what is actually used
    device: torch.device
    weight_dtype: torch.dtype  # frozen UNet and text-encoder weights (trained parameters: fp32)
    autocast_dtype: torch.dtype | None  # dtype of matmuls/convs under torch.autocast; None: none
    use_grad_scaler: bool  # fp16 only
    note: str = ""  # why the request was changed, for the user


def resolve_precision(requested: str, device) -> Precision:
    """Turn --precision into dtypes for `device`: fp16 with a GradScaler (the T4 recipe), bf16 (fp16
    on GPUs without native bf16, like the T4), or fp32 (fp16 on a CPU, which has no fast fp16)."""
    _check("precision", requested, PRECISIONS)
    device, note = torch.device(device), ""
    if device.type != "cuda" and requested == "fp16":
        requested, note = "fp32", (f"no CUDA GPU ({device.type}): training in fp32 instead of fp16 "
                                   "(pass --precision bf16 for half the memory)")
    cuda_bf16 = requested == "bf16" and device.type == "cuda"
    if cuda_bf16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        requested, note = "fp16", "this GPU has no native bf16: training in fp16 with loss scaling"
    dtype = DTYPES[requested]
    return Precision(requested, device, weight_dtype=dtype, use_grad_scaler=requested == "fp16",
                     autocast_dtype=None if requested == "fp32" else dtype, note=note)


def make_grad_scaler(precision: Precision) -> torch.amp.GradScaler:
    """A loss scaler for fp16; for bf16/fp32 a disabled one (its methods then do nothing)."""
    return torch.amp.GradScaler(precision.device.type, enabled=precision.use_grad_scaler)
