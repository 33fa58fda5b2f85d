"""Strict, low-RAM loading of safetensors weights into a module. The fp32 SDXL UNet is 10 GB, Colab
has 12.7 GB of RAM: a random-init model plus a full state dict would not fit. So the module is built
on the `meta` device, all names and shapes are checked before a byte is read, and the tensors are
read one at a time from the memory-mapped file, each converted straight to its dtype and device.
A quantised load maps each tensor alone instead (TensorMaps): see there why."""

from __future__ import annotations

import json
import mmap
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

import torch
from safetensors import safe_open
from torch import nn

from minidream import files
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
    op: str = ""  # "" as is | "squeeze" (reshape) | "transpose" | "q"/"k"/"v" third of fused qkv


Weights = Mapping[str, Union[TensorRef, torch.Tensor]]  # module tensor name -> where to get it


# ----------------------------------------------------------------------------------- reading files


def refuse_pickle(path: Path) -> None:
    """Pickle checkpoints run code when loaded; say so and say how to get a safetensors file."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle file ({path.suffix}). Loading a pickle runs Python code stored "
            "inside it, so a malicious checkpoint could take over this machine; minidream reads "
            "only .safetensors. Download the .safetensors version (most model pages offer one), "
            "or convert a file you trust once with:\n  python -c \"import torch; from "
            f"safetensors.torch import save_file; sd = torch.load('{path}', map_location='cpu', "
            "weights_only=True); sd = sd.get('state_dict', sd); save_file({k: v.contiguous() for "
            f"k, v in sd.items() if torch.is_tensor(v)}}, '{path.with_suffix('.safetensors')}')\"")


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
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be "
                              "truncated (re-download it) or another format.") from e


def read_json(path: Path) -> dict:
    """A model's JSON file (config.json, model_index.json, ...); a damaged one is a CheckpointError."""
    return files.read_json(path, CheckpointError)


def widen_float8(tensor: torch.Tensor) -> torch.Tensor:
    """An 8-bit float tensor (F8_E4M3 / F8_E5M2 files) as float32, which holds its values exactly
    and has every kernel (isfinite has no float8 one); any other tensor as it is."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # safetensors' dtype names


class TensorMaps:
    """safe_open's get_tensor and get_slice(key)[rows], each tensor a memory map of its own bytes.
    safe_open maps the whole file once and returns views of it: every page read then counts in the
    RSS for as long as any view lives (the unquantised weights do), 4.9 GB for SDXL's UNet on top
    of a quantised load's codes. Mapped one by one, a weight's pages leave with the weight."""

    def __init__(self, file):  # `file` opened "rb"; already checked by read_header
        self.file, size = file, int.from_bytes(file.read(8), "little")
        self.header, self.data_start = json.loads(file.read(size)), 8 + size

    def get_tensor(self, key: str, rows: slice | None = None) -> torch.Tensor:
        entry = self.header[key]
        dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if rows is not None:  # rows start:stop along dim 0 only
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows.start * row_bytes, begin + rows.stop * row_bytes
            shape = [rows.stop - rows.start, *shape[1:]]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        start = self.data_start + begin
        skip = start % mmap.ALLOCATIONGRANULARITY  # a map starts on a page
        view = mmap.mmap(self.file.fileno(), skip + end - begin, offset=start - skip,
                         access=mmap.ACCESS_COPY)  # private, as safe_open's: writes stay ours
        return torch.frombuffer(view, dtype=torch.uint8, offset=skip).view(dtype).view(shape)

    def get_slice(self, key: str):
        """What `[start:stop]` reads rows of, as safe_open's slices do."""
        return Rows(lambda rows: self.get_tensor(key, rows))


@dataclass(frozen=True)
class Rows:
    read: Callable[[slice], torch.Tensor]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.read(rows)


def _read(handle, ref: TensorRef) -> torch.Tensor:
    """Read one tensor and apply its op; q/k/v read only their third of the rows."""
    if ref.op in ("q", "k", "v"):
        start = "qkv".index(ref.op) * ref.shape[0]
        return widen_float8(handle.get_slice(ref.key)[start : start + ref.shape[0]])
    tensor = widen_float8(handle.get_tensor(ref.key))
    return tensor.t().contiguous() if ref.op == "transpose" else tensor.reshape(ref.shape)


# -------------------------------------------------------------------------------- filling a module


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters go to `meta` as they are registered (no memory, no init cost)
    but whose buffers are real: non-persistent ones (CLIP's `position_ids`) are in no checkpoint."""
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
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(sorted(names)[:limit]) + more


def check_weights(model: nn.Module, weights: Weights, what: str) -> None:
    """Strict check before any reading: same names and shapes, or one error saying what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    problems = [f"{len(keys)} {text}: {_names(keys)}" for keys, text in (
        (missing, "tensors of the model are missing from the checkpoint"),
        (unexpected, "checkpoint tensors match nothing in the model")) if keys]
    common = sorted(expected.keys() & weights.keys())
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {expected[k]}" for k in common
             if tuple(weights[k].shape) != expected[k]]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{what}: the checkpoint does not fit the model built from its config"
                              ".\n  " + "\n  ".join(problems) + "\nCheck that the file is the "
                              "model you meant (and its config.json matches it).")


def read_tensors(weights: Weights, mapped: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of `weights`, read one at a time from the open files: as views
    of the memory-mapped files, or if not `mapped` each in a map of its own (TensorMaps)."""
    files = sorted({ref.file for ref in weights.values() if isinstance(ref, TensorRef)})
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) if mapped
                   else TensorMaps(stack.enter_context(open(f, "rb"))) for f in files}
        for name, ref in weights.items():
            yield name, _read(handles[ref.file], ref) if isinstance(ref, TensorRef) else ref


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """`tensor` on `device`, in `dtype` if it is floating-point (integer buffers keep theirs)."""
    return tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)


def load_weights(model: nn.Module, weights: Weights, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu", what: str = "model",
                 quantise: Callable | None = None) -> nn.Module:
    """Fill `model` (built under parameters_on_meta) with `weights`, one tensor at a time, floating-
    point ones in `dtype`; buffers no checkpoint holds (non-persistent) move to `device` too.
    quantise(layer, weight, dtype) (minidream.quant.linear.quantiser) takes each nn.Linear's weight
    as read and stores it quantised, cast to `dtype` chunk by chunk: the whole model never exists in
    `dtype`. Each tensor is then mapped alone (TensorMaps), so that only the codes, the other
    weights and one Linear weight are ever resident."""
    check_weights(model, weights, what)
    modules = dict(model.named_modules())  # built once: faster than get_submodule per tensor
    for name, tensor in read_tensors(weights, mapped=quantise is None):
        owner, _, leaf = name.rpartition(".")
        if quantise and leaf == "weight" and isinstance(modules[owner], nn.Linear):
            quantise(modules[owner], tensor.to(device), dtype)  # cast chunk by chunk
            del tensor  # before the next one is read
            continue
        params, buffers = modules[owner]._parameters, modules[owner]._buffers
        old = params[leaf] if leaf in params else buffers[leaf]
        if tensor.is_floating_point() != old.is_floating_point():  # an int32 weight: a damaged file
            source = getattr(weights[name], "file", what)
            raise CheckpointError(f"{source}: {name} is {tensor.dtype}, not {old.dtype}")
        if leaf in params:
            params[leaf] = nn.Parameter(_cast(tensor, dtype, device), old.requires_grad)
        else:
            buffers[leaf] = _cast(tensor, dtype, device)
    for module in model.modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "meta":
                owner = type(module).__name__
                raise CheckpointError(f"{what}: buffer {leaf!r} of {owner} has no value")
            if buffer is not None:
                module._buffers[leaf] = _cast(buffer, dtype, device)
    return model
