"""Int8 weights: per-output-channel absmax quantisation (LLM.int8(), Dettmers et al. 2022, sec. 2:
absmax quantisation, here of the weight only and with one scale per row; no outlier split).

    s_o = absmax_i |W_oi| / 127        q_oi = round(W_oi / s_o) in [-127, 127]        W ~ q * s

One byte per weight plus one scale per output channel: about half of fp16.
"""

import torch

CHUNK = 2**14  # weights quantised at a time on the CPU: fp32 temporaries of 64 KB


def chunk_size(w: torch.Tensor) -> int:
    """CHUNK on the CPU (see quantise_int8); the whole w on a GPU, whose caching allocator keeps
    nothing in the process's memory, and where small pieces would only add kernel launches."""
    return CHUNK if w.device.type == "cpu" else max(1, w.numel())


def quantise_int8(w: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> codes (out, in) int8, scales (out, 1) in `dtype` (default w's), w cast to it
    first. On the CPU rows go in chunks of about CHUNK weights, each cast alone: W never exists
    whole in `dtype` or fp32, and the temporaries stay under glibc's 128 KiB mmap threshold.
    Freeing larger ones raises that threshold, and the heap then kept GBs of freed holes between
    the codes (benchmarks/quantised_base.py)."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], 1, device=w.device)  # fp32
    step = max(1, chunk_size(w) // max(1, w.shape[1]))
    for rows in (slice(r, r + step) for r in range(0, w.shape[0], step)):
        chunk = w[rows].to(dtype or w.dtype).float()
        scales[rows] = chunk.abs().amax(dim=1, keepdim=True) / 127  # (rows, 1)
        codes[rows] = torch.round(chunk / scales[rows].clamp_min(1e-30)).clamp(-127, 127)
    return codes, scales.to(dtype or w.dtype)


def dequantise_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes (out, in) int8, scales (out, 1) -> W (out, in) in the scales' dtype."""
    return codes.to(scales.dtype) * scales
