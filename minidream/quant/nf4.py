"""4-bit NormalFloat (NF4) weights, block-wise: QLoRA (Dettmers et al. 2023), sec. 3.

Trained weights are close to N(0, sigma^2), so after dividing a block by its absmax the values
follow a normal law on [-1, 1]. NF4's 16 levels give each level an equal share of that law: they
are quantiles of N(0, 1), normalised to [-1, 1], with an exact zero (padding and zeros stay 0).
As in QLoRA's code (bitsandbytes' create_normal_map), zero is shared: 8 positive quantiles at
probabilities linspace(delta, 1/2, 9)[:-1] and 7 negative ones at linspace(delta, 1/2, 8)[:-1],
delta = 1/2 (1 - 1/(2*15) + 1 - 1/(2*16)) keeping the ends finite (eq. 4's q_i, made asymmetric).

    absmax_b = max |W| over block b of 64 weights      code = argmin_j |W / absmax_b - level_j|
    W ~ level[code] * absmax_b                          two codes per byte (high nibble first)

Memory per weight: 4 bits + one absmax per 64 weights, kept in the weight dtype (fp16: 0.25 bit,
4.25 bits in all). QLoRA's double quantisation (sec. 3, 8-bit absmax in blocks of 256) would bring
the absmax to 0.127 bit per weight; it is left out: on SDXL's 2.23 B Linear weights it saves 35 MB.
"""

import math

import torch
import torch.nn.functional as F

from minidream.quant.int8 import chunk_size

BLOCK = 64  # weights per absmax block (QLoRA's)
DELTA = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))  # = 0.9677083: the outermost quantile's p


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1], with level 7 exactly 0 (QLoRA, appendix E)."""
    normal_quantile = torch.special.ndtri  # Q_X(p), the inverse CDF of N(0, 1)
    positive = normal_quantile(torch.linspace(DELTA, 0.5, 9, dtype=torch.float64)[:-1])  # 8
    negative = -normal_quantile(torch.linspace(DELTA, 0.5, 8, dtype=torch.float64)[:-1])  # 7
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.max()).float()


LEVELS = nf4_levels()  # (16,)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (2n,) in 0..15 -> (n,) uint8, two per byte: the even one in the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 -> codes (2n,) uint8 in 0..15 (pack's inverse)."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten()


def quantise_nf4(w: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape) -> packed codes (n_blocks * 32,) uint8, absmax (n_blocks,) in `dtype` (default
    w's), w cast to it first; the last block is padded with zeros (SDXL's Linear weights fill whole
    blocks). The weights go in chunks, each cast alone, as in quantise_int8."""
    flat = w.reshape(-1)  # a view of a contiguous w
    n_blocks = -(-flat.numel() // BLOCK)
    packed = torch.empty(n_blocks * BLOCK // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=dtype or w.dtype, device=w.device)
    levels = LEVELS.to(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    step = -(-chunk_size(w) // BLOCK) * BLOCK  # whole blocks
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].to(absmax.dtype).float()
        blocks = F.pad(chunk, (0, -chunk.numel() % BLOCK)).view(-1, BLOCK)  # (blocks, 64)
        block_absmax = blocks.abs().amax(dim=1, keepdim=True)  # (blocks, 1)
        normed = blocks / block_absmax.clamp_min(1e-30)  # in [-1, 1]; an all-zero block stays 0
        codes = torch.bucketize(normed, midpoints, out_int32=True)  # the nearest level's index
        packed[start // 2 : start // 2 + blocks.numel() // 2] = pack(codes.flatten())
        absmax[start // BLOCK : start // BLOCK + len(blocks)] = block_absmax.flatten()
    return packed, absmax


def dequantise_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    """packed (n_blocks * 32,) uint8, absmax (n_blocks,) -> W of `shape` in the absmax's dtype."""
    levels = LEVELS.to(absmax.device, absmax.dtype)
    values = levels[unpack(packed).int()].view(-1, BLOCK)  # (n_blocks, 64)
    return (values * absmax[:, None]).flatten()[: math.prod(shape)].view(shape)
