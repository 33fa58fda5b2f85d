"""Running the real model code on fake tensors and counting the bytes it holds (for memory.py).

A fake tensor (torch._subclasses.fake_tensor) has a shape, a dtype and a device but no data: every
op computes only the shape and dtype of its result. So the full SDXL UNet can take a 1024 px
training step on a laptop in seconds, with no GPU and no weights. What it cannot tell is how much
memory that step would hold, so `ByteCounter` watches every op from below autograd:

    each op's outputs -> their storages; a storage not seen before adds its bytes to `live`
    when Python frees a storage (a weakref finalizer fires) its bytes leave `live` again
    `peak` = the largest `live` seen

Everything that keeps a tensor alive keeps its bytes counted: the weights, autograd's saved
activations, the autocast weight-cast cache, gradients; views share their base's storage and add
nothing. That is what torch.cuda.max_memory_allocated() reports on a GPU, where the caching
allocator rounds every block up to 512 bytes (`block`).

Why fake *CPU* tensors: a CPU-only torch build cannot run autograd on fake CUDA tensors (it looks
for CUDA's device guard). CPU autocast runs matmuls, convolutions and attention in fp16 like CUDA
autocast, but keeps normalisations, softmax and upsampling in the input dtype, where CUDA autocast
computes them in fp32 (ATen autocast_mode.h, AT_FORALL_FP32): `cuda_autocast_policy` makes them
fp32 here too, because fp32 GroupNorm outputs and upsampled maps are real GPU memory.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

CUDA_BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this
ATTENTION_KERNELS = {  # SDPA's fused kernels: none of them materialises the (B, heads, L, L) scores
    "_scaled_dot_product_flash_attention_for_cpu": "fused flash attention (CPU)",
    "_scaled_dot_product_efficient_attention": "memory-efficient attention",
    "_scaled_dot_product_flash_attention": "FlashAttention-2",
}


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_cpu_attention_flops._get_raw = _cpu_attention_backward_flops._get_raw = True  # take tensors (FlopCounterMode)


# torch.utils.flop_counter's formulas (matmuls, convolutions, GPU attention kernels), plus the CPU
# flash-attention ops it does not know, which cost what any exact attention costs. (Its
# FlopCounterMode is not used: its module tracker keeps tensors alive and would inflate the count.)
FLOP_FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def fake_tensors() -> FakeTensorMode:
    """The mode inside which modules are materialised and run without memory or compute.
    allow_non_fake_inputs: real CPU tensors (CLIP's position_ids buffer, the noise schedule) mix in."""
    return FakeTensorMode(allow_non_fake_inputs=True)


class ByteCounter(TorchDispatchMode):
    """Bytes of every storage alive, at every op (see the module docstring).

    peak / peak_tagged: the largest total and, at that moment, the bytes of storages tagged by
    `tag` (e.g. "grad"). ops: how often each aten op ran (to check which attention kernel did).
    flops: floating-point operations of the matmuls, convolutions and attention that ran.
    """

    def __init__(self, block: int = CUDA_BLOCK):
        super().__init__()
        self.block = block
        self.live = 0
        self.peak = 0
        self.sizes: dict[int, int] = {}  # id(storage) -> counted bytes, while alive
        self.tags: dict[int, str] = {}  # id(storage) -> tag, for the storages that have one
        self.tagged: dict[str, int] = {}  # tag -> bytes alive
        self.peak_tagged: dict[str, int] = {}
        self.ops: dict[str, int] = {}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        if func.overloadpacket in FLOP_FORMULAS:
            self.flops += FLOP_FORMULAS[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    def add(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage (once, until it is freed)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.sizes:
            return
        size = -(-storage.nbytes() // self.block) * self.block  # round up to the allocator's block
        self.sizes[key] = size
        self.live += size
        weakref.finalize(storage, self._free, key)
        self.new_peak()

    def _free(self, key: int) -> None:
        size = self.sizes.pop(key)
        self.live -= size
        tag = self.tags.pop(key, None)
        if tag is not None:
            self.tagged[tag] -= size

    def tag(self, tensor: torch.Tensor, tag: str) -> None:
        """Say what a counted storage is (a gradient, say), for the breakdown at the peak."""
        key = id(tensor.untyped_storage())
        if key in self.sizes and key not in self.tags:
            self.tags[key] = tag
            self.tagged[tag] = self.tagged.get(tag, 0) + self.sizes[key]

    def new_peak(self) -> None:
        if self.live > self.peak:
            self.peak, self.peak_tagged = self.live, dict(self.tagged)

    def reset_peak(self) -> None:
        self.peak, self.peak_tagged = self.live, dict(self.tagged)

    def attention_kernels(self) -> list[str]:
        """The fused SDPA kernels that ran; `math` if attention fell back to explicit Q K^T scores."""
        found = [text for op, text in ATTENTION_KERNELS.items() if op in self.ops]
        if "_scaled_dot_product_attention_math" in self.ops:
            found.append("math (materialises the L x L scores)")
        return found


def count_gradients(params, counter: ByteCounter) -> list:
    """Tag each parameter's .grad as "grad" once autograd has written it (the handles: remove them)."""
    return [p.register_post_accumulate_grad_hook(lambda p: counter.tag(p.grad, "grad")) for p in params]


# ----------------------------------------------------------------------------- CUDA autocast

_FP32_UNDER_CUDA_AUTOCAST = ("layer_norm", "group_norm", "interpolate", "softmax", "log_softmax")


@contextlib.contextmanager
def cuda_autocast_policy(enabled: bool = True):
    """While active, the functional ops CUDA autocast runs in fp32 (and CPU autocast does not) get
    fp32 inputs whenever autocast is on, so they return fp32 as on a GPU.

    The functions are swapped in torch.nn.functional itself (and put back on exit), not wrapped by
    a TorchFunctionMode: modules look them up there at call time, and activation checkpointing
    recomputes blocks inside backward, where a function mode is no longer active.
    """
    if not enabled:
        yield
        return
    originals = {name: getattr(F, name) for name in _FP32_UNDER_CUDA_AUTOCAST}

    def in_fp32(fn):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                def up(a):
                    return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

                args, kwargs = tree_map(up, args), tree_map(up, kwargs)
            return fn(*args, **kwargs)

        return run

    for name, fn in originals.items():
        setattr(F, name, in_fp32(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


# ----------------------------------------------------------------------------- modules

def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """A meta-device module (built in its final dtypes) -> fake CPU tensors; call inside
    fake_tensors() and a ByteCounter to count its weights. (Changing dtypes afterwards fails on
    fake tensors: build in the right dtype first.)"""
    return module.to_empty(device="cpu")


class ShapeTokenizer:
    """Stands in for a CLIP tokenizer when only shapes matter: every prompt becomes `length` ids
    (a model folder with config.json files only has no vocabulary)."""

    def __init__(self, length: int = 77):
        self.length, self.added = length, []

    def __call__(self, texts, return_tensors=None, **kwargs):
        class Ids:
            input_ids = (torch.zeros(len(texts), self.length, dtype=torch.long) if return_tensors == "pt"
                         else [0] if isinstance(texts, str)  # one word (textual inversion's init word)
                         else [[0] * self.length for _ in texts])

        return Ids()

    # What textual_inversion.add_token asks of a tokenizer, for a new word (pivotal tuning's)
    def get_vocab(self) -> dict: return {}
    def __len__(self) -> int: return 49408 + len(self.added)  # CLIP's vocabulary, then the new word(s)
    def add_tokens(self, tokens) -> None: self.added += list(tokens)
    def convert_tokens_to_ids(self, tokens) -> list[int]: return [49408 + self.added.index(t) for t in tokens]
