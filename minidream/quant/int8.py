"""Int8 weights: per-output-channel absmax quantisation (LLM.int8(), Dettmers et al. 2022, sec. 2:
absmax quantisation, here of the weight only and with one scale per row; no outlier split).

    s_o = absmax_i |W_oi| / 127        q_oi = round(W_oi / s_o) in [-127, 127]        W ~ q * s

One byte per weight plus one scale per output channel: about half of fp16.
"""

import torch


def quantise_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> codes (out, in) int8, scales (out, 1) in w's dtype."""
    absmax = w.float().abs().amax(dim=1, keepdim=True)  # (out, 1)
    scales = absmax / 127
    codes = torch.round(w.float() / scales.clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
    return codes, scales.to(w.dtype)


def dequantise_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes (out, in) int8, scales (out, 1) -> W (out, in) in the scales' dtype."""
    return codes.to(scales.dtype) * scales
