"""Building blocks of the UNet (unet.py) and the VAE (vae.py); every size comes in as an argument.

Attribute names (norm1, conv1, time_emb_proj, conv_shortcut, to_q, to_out.0, ...) equal diffusers',
so a diffusers checkpoint loads with no rename table."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps, t: (N,) -> (N, dim) in fp32.

    Vaswani et al. 2017 sec. 3.5, used for the timestep by Ho et al. 2020 (appendix B) and by SDXL
    for its size/crop ids: f_i = max_period ** (-i / (dim/2 - freq_shift)), features
    [sin(t f), cos(t f)] (SD: cos first, freq_shift 0). fp32 always: values up to 4096 need it."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (N, half)
    halves = [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(halves[::-1] if flip_sin_to_cos else halves, dim=-1)  # (N, 2*half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # odd dim: one zero feature at the end
    return emb


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip (1x1 conv if channels change): the residual
    block of the LDM UNet and autoencoder (Rombach et al. 2022; DDPM appendix B). With temb_channels
    (UNet) a Linear adds a bias per channel from `temb`, already through SiLU (the UNet does it)."""

    gradient_checkpointing = False  # see maybe_checkpoint

    def __init__(self, in_ch, out_ch, temb_channels, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_ch) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.conv_shortcut = None if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout is 0 in every SD model: omitted)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve H and W by a stride-2 3x3 conv; padding=0 (VAE) pads right/bottom only, as trained."""

    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest; or to `size`: the UNet passes its next skip's), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size, scale_factor=None if size else 2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017 eq. 1, sec. 3.2.2).

    Self-attention when `context` is None, else cross-attention to it (the text tokens), via SDPA.
    q, k, v, out are separate Linears (LoRA adapts them); to_out is a ModuleList for `to_out.0`."""

    def __init__(self, query_dim, heads, head_dim, context_dim=None, qkv_bias=False):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, x, context=None):
        """x: (B, L, query_dim), context: (B, S, context_dim) or None -> (B, L, query_dim)."""
        context = x if context is None else context
        # (B, L, heads*D) -> (B, L, heads, D) -> (B, heads, L, D); SDPA reads the strided view.
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, S, D)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, S, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, D)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, L, heads*D) -> query_dim


def maybe_checkpoint(module, *args):
    """module(*args), through activation checkpointing if module.gradient_checkpointing (set by
    UNet.enable_gradient_checkpointing) and autograd is recording.

    use_reentrant=False still gives parameter gradients when no input requires grad (frozen UNet,
    LoRA weights) and restores the RNG state, so a LoRA dropout draws the same mask recomputed."""
    if module.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)

