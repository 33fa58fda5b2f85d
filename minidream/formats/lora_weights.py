"""Adapters as plain data: {module name: LoRAWeights} taken from, checked against and put into a model.

The bridge between the LoRA layers (lora_stack.py) and adapter files (lora_files.py): a file's
keys are turned into module names and LoRAWeights there, and here they are validated against the
model (names, ranks, shapes) before anything is changed, so a LoRA made for another base model
fails with a clear message and leaves the model untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from minidream.errors import UserError
from minidream.formats.lora_stack import adapter_names, stack_layer
from minidream.lora import LoRALayer
from minidream.lora_file import LoRAWeights


@dataclass
class DoRAWeights(LoRAWeights):
    """A DoRA module's adapter (methods/dora.py): LoRA's, plus the magnitude m, 1-D: one number per
    output channel (on_output, peft's and LyCORIS's default) or per input channel (LyCORIS's
    wd_on_out=False, e.g. OneTrainer's files)."""

    magnitude: torch.Tensor
    on_output: bool = True


class LoRAFileError(UserError):
    """A LoRA file minidream cannot read or apply (not safetensors, unknown layout, wrong shapes)."""


class LoRAMismatchError(LoRAFileError):
    """A LoRA names modules the model does not have (wrong base model, typo'd key)."""


def mismatch_error(unmatched: list[str], where: str, hint: str = "") -> LoRAMismatchError:
    """Build the error that lists the first few unmatched keys and how many there are."""
    shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
    return LoRAMismatchError(
        f"{len(unmatched)} LoRA key(s) match no module of {where}: {shown}. "
        "The LoRA was probably made for another base model (e.g. SD 1.5 vs SDXL) or a key is "
        f"misspelled; nothing was loaded.{(' ' + hint) if hint else ''}"
    )


def _fit(tensor: torch.Tensor, shape: tuple) -> torch.Tensor | None:
    """`tensor` as `shape` when only trailing 1x1 dims differ (SD 1.x files hold 1x1-conv LoRAs
    for proj_in/out, Linear layers in SDXL, and back), else None."""
    if tuple(tensor.shape[:2]) == tuple(shape[:2]) and tensor.numel() == math.prod(shape):
        return tensor.reshape(shape)
    return None


def check_adapter_weights(model: nn.Module, name: str, weights: dict[str, LoRAWeights]) -> dict:
    """Validate `weights` against `model` (names, ranks, shapes, free adapter name) without
    changing anything; returns {module name: (down, up, alpha, DoRA magnitude or None)} fitted to
    the module shapes (a magnitude shaped (out, 1[, 1, 1]) or (1, in[, 1, 1]) like the weight)."""
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} is already loaded in {type(model).__name__}; "
                         "pick another name or remove_adapter() it first")
    known = dict(model.named_modules())
    trained = [k for k in weights if isinstance(known.get(k), LoRALayer)]
    if trained:
        raise ValueError(f"{trained[0]} carries a LoRA being trained; load files onto a fresh model")
    unmatched = [k for k in weights if not isinstance(known.get(k), (nn.Linear, nn.Conv2d))]
    if unmatched:
        raise mismatch_error(unmatched, type(model).__name__)
    fitted = {}
    for key, w in weights.items():
        module = known[key]
        if w.down.dim() < 2 or w.up.dim() < 2:
            raise LoRAFileError(f"LoRA shape mismatch at {key}: down {tuple(w.down.shape)} / up "
                             f"{tuple(w.up.shape)} are not matrices (a corrupt file?)")
        if w.down.shape[0] != w.up.shape[1]:
            raise LoRAFileError(f"LoRA rank mismatch at {key}: down has rank {w.down.shape[0]}, "
                             f"up has rank {w.up.shape[1]} (a corrupt or hand-edited file?)")
        rank = w.down.shape[0]
        is_conv = isinstance(module, nn.Conv2d)
        in_shape = (rank, module.in_channels, *module.kernel_size) if is_conv else (rank, module.in_features)
        out_shape = (module.out_channels, rank, 1, 1) if is_conv else (module.out_features, rank)
        down, up = _fit(w.down, in_shape), _fit(w.up, out_shape)
        if down is None or up is None:
            raise LoRAFileError(f"LoRA shape mismatch at {key}: down {tuple(w.down.shape)} / up "
                             f"{tuple(w.up.shape)} do not fit the module's weight "
                             f"{tuple(module.weight.shape)} (wanted {in_shape} / {out_shape}); "
                             "the LoRA was made for another base model")
        fitted[key] = (down, up, w.alpha, _fit_magnitude(key, w, module.weight.shape))
    return fitted


def _fit_magnitude(key: str, w: LoRAWeights, shape: tuple) -> torch.Tensor | None:
    """A DoRA magnitude shaped to scale the weight's output (out, 1, ..) or input (1, in, ..)
    channels; None for a LoRA."""
    if not isinstance(w, DoRAWeights):
        return None
    axis = 0 if w.on_output else 1
    if w.magnitude.numel() != shape[axis]:
        side = "output" if w.on_output else "input"
        raise LoRAFileError(f"DoRA magnitude mismatch at {key}: {w.magnitude.numel()} numbers for "
                            f"the {shape[axis]} {side} channels of the module's weight "
                            f"{tuple(shape)}; the LoRA was made for another base model")
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return w.magnitude.reshape(view)


def load_adapter_weights(model: nn.Module, name: str, weights: dict[str, LoRAWeights],
                         scale: float = 1.0, dtype: torch.dtype = torch.float32) -> None:
    """Add adapter `name` holding `weights` to `model`. Everything is checked first
    (check_adapter_weights), so a bad LoRA leaves the model untouched."""
    for key, (down, up, alpha, magnitude) in check_adapter_weights(model, name, weights).items():
        layer = stack_layer(model.get_submodule(key))
        layer.add_adapter(name, down, up, alpha, scale, dtype, magnitude)
