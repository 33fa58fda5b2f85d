"""Strict, low-RAM loading of safetensors weights into a module.

The fp32 SDXL UNet is 10 GB and Colab has 12.7 GB of RAM: a random-init model plus a full state dict would not
fit. So the module is built on the `meta` device, all names and shapes are checked before a byte is read, and the
tensors are read one at a time from the memory-mapped file, each converted straight to its dtype and device."""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from safetensors import safe_open
from torch import nn
from minidream.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the problem and the fix."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives on disk, and how to reshape it for the module that receives it."""

    file: Path  # the .safetensors file holding it
    key: str  # its name inside that file
    shape: tuple[int, ...]  # its shape after `op`
    op: str = ""  # "" as is | "squeeze" 1x1 conv -> linear | "transpose" | "q"/"k"/"v" third of fused qkv


Weights = Mapping[str, Union[TensorRef, torch.Tensor]]  # module tensor name -> where to get it


# --------------------------------------------------------------------------------------------- reading files


def refuse_pickle(path: Path) -> None:
    """Pickle checkpoints run code when loaded; say so and say how to get a safetensors file."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle file ({path.suffix}). Loading a pickle runs Python code stored inside it, so a "
            "malicious checkpoint could take over this machine; minidream reads only .safetensors. Download the "
            ".safetensors version (most model pages offer one), or convert a file you trust once with:\n"
            '  python -c "import torch; from safetensors.torch import save_file; '
            f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
            f"save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, "
            f"'{path.with_suffix('.safetensors')}')\"")


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in one safetensors file; reads the header only."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                              "(re-download it) or another format.") from e


def read_json(path: Path, error: type = CheckpointError) -> dict:
    """A JSON object file (config.json, model_index.json, subject.json, ...), or `error` naming the file."""
    try:
        value = json.loads(path.read_bytes()) if path.stat().st_size < 2**24 else "a file over 16 MB"
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deep
        value = e
    if not isinstance(value, dict):
        raise error(f"{path} is not valid JSON holding an object {{...}} ({str(value)[:80]}); fix or replace it")
    return value


def widen_float8(tensor: torch.Tensor) -> torch.Tensor:
    """An 8-bit float tensor (safetensors' F8_E4M3 / F8_E5M2: files shared at half size) as float32, which
    holds each of its values exactly and supports every operation (isfinite has no float8 kernel); any
    other tensor as it is."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def _read(handle, ref: TensorRef) -> torch.Tensor:
    """Read one tensor and apply its op; q/k/v read only their third of the rows."""
    if ref.op in ("q", "k", "v"):
        start = "qkv".index(ref.op) * ref.shape[0]
        return widen_float8(handle.get_slice(ref.key)[start : start + ref.shape[0]])
    tensor = widen_float8(handle.get_tensor(ref.key))
    if ref.op == "squeeze":
        return tensor.reshape(ref.shape)
    if ref.op == "transpose":
        return tensor.t().contiguous()
    return tensor


# --------------------------------------------------------------------------------------------- filling a module


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters go to `meta` as they are registered (no memory; the random init that follows
    costs nothing) but whose buffers are real: non-persistent ones (CLIP's `position_ids`) are in no checkpoint."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(model: nn.Module, weights: Weights, what: str) -> None:
    """Strict check before any reading: same names, same shapes, or one error saying what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing, unexpected, problems = expected.keys() - weights.keys(), weights.keys() - expected.keys(), []
    if missing:
        problems.append(f"{len(missing)} tensors of the model are missing from the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors match nothing in the model: {_names(unexpected)}")
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {expected[k]}"
             for k in sorted(expected.keys() & weights.keys()) if tuple(weights[k].shape) != expected[k]]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{what}: the checkpoint does not fit the model built from its config.\n  "
                              + "\n  ".join(problems)
                              + "\nCheck that the file is the model you meant (and its config.json matches it).")


def read_tensors(weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of `weights`, read one at a time from the open files."""
    files = sorted({ref.file for ref in weights.values() if isinstance(ref, TensorRef)})
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        for name, ref in weights.items():
            yield name, _read(handles[ref.file], ref) if isinstance(ref, TensorRef) else ref


def load_weights(model: nn.Module, weights: Weights, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu", what: str = "model") -> nn.Module:
    """Fill `model` (built under `parameters_on_meta`) with `weights`, one tensor at a time, in place of its meta
    tensors; floating-point ones become `dtype`. Buffers no checkpoint holds (non-persistent) move to `device` too."""
    check_weights(model, weights, what)
    modules = dict(model.named_modules())  # built once: faster than get_submodule per tensor
    for name, tensor in read_tensors(weights):
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        slot = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
        if tensor.is_floating_point() != slot.is_floating_point():  # an int32 weight: a damaged file
            raise CheckpointError(f"{getattr(weights[name], 'file', what)}: {name} is {tensor.dtype}, not {slot.dtype}")
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
        else:
            owner._buffers[leaf] = tensor
    for owner in model.modules():
        for leaf, buffer in owner._buffers.items():
            if buffer is not None and buffer.device.type == "meta":
                raise CheckpointError(f"{what}: buffer {leaf!r} of {type(owner).__name__} has no value")
            if buffer is not None:
                owner._buffers[leaf] = buffer.to(device, dtype if buffer.is_floating_point() else buffer.dtype)
    return model
