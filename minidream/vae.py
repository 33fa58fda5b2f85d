"""The KL-regularised autoencoder of latent diffusion (AutoencoderKL, Rombach et al. 2022 sec. 3.1).

The encoder maps an RGB image in [-1, 1] to a diagonal Gaussian over a 4-channel latent 8x smaller
per side; the decoder maps a latent back. encode/decode do NOT apply the latent scale (z *
scaling_factor has ~unit variance, LDM sec. 4.3.2): the caller does, visibly. The SDXL VAE overflows
fp16: see `vae_dtype`. Reads bottom-up; keys and shapes equal diffusers' AutoencoderKL's."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.diffusers_config import read_diffusers_config
from minidream.layers import Attention, Downsample, ResnetBlock, Upsample


def _resnets(in_ch, out_ch, num_layers, cfg):
    """`num_layers` resnets (no time embedding), the first taking `in_ch` channels."""
    return nn.ModuleList([ResnetBlock(out_ch if i else in_ch, out_ch, None, cfg.norm_num_groups,
                                      cfg.norm_eps) for i in range(num_layers)])


class VAEAttention(Attention):
    """Single-head self-attention over the H*W positions, GroupNorm first, residual around."""

    def __init__(self, channels, groups, eps):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, H*W, C)
        h = super().forward(h)  # (B, H*W, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class VAEMidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (no time embedding in the VAE)."""

    def __init__(self, ch, cfg):
        super().__init__()
        self.resnets = _resnets(ch, ch, 2, cfg)
        self.attentions = nn.ModuleList([VAEAttention(ch, cfg.norm_num_groups, cfg.norm_eps)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderLevel(nn.Module):
    """`num_layers` resnets, then (except at the last level) a stride-2 conv."""

    def __init__(self, in_ch, out_ch, num_layers, downsample, cfg):
        super().__init__()
        self.resnets = _resnets(in_ch, out_ch, num_layers, cfg)
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)] if downsample else [])

    def forward(self, x):  # each input is freed once its output exists (a loop, not nn.Sequential)
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderLevel(nn.Module):
    """`num_layers` resnets, then (except at the last level) nearest 2x upsampling and a conv."""

    def __init__(self, in_ch, out_ch, num_layers, upsample, cfg):
        super().__init__()
        self.resnets = _resnets(in_ch, out_ch, num_layers, cfg)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2*latent_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < n - 1, cfg)
            for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) latent -> (B, out_channels, h*f, w*f) image."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], kernel_size=3, padding=1)
        self.mid_block = VAEMidBlock(ch[-1], cfg)
        self.up_blocks = nn.ModuleList([  # deepest level first
            DecoderLevel(ch[min(n - i, n - 1)], ch[n - 1 - i], cfg.layers_per_block + 1, i < n - 1,
                         cfg) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def vae_dtype(config, wanted):
    """The VAE's dtype: fp32, not fp16, if config.force_upcast (the SDXL VAE overflows fp16: NaN
    latents, black images). fp16-fix VAEs keep fp16; bf16 (fp32's range) stays, as in diffusers."""
    return torch.float32 if config.force_upcast and wanted == torch.float16 else wanted


@dataclass
class VAEConfig:
    """AutoencoderKL hyperparameters, named as in diffusers' vae/config.json; defaults: SDXL."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4  # the only type in SD autoencoders
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4  # likewise
    block_out_channels: tuple = (128, 256, 512, 512)  # channels per level; levels-1 halvings, f=8
    layers_per_block: int = 2  # encoder resnets per level (decoder: one more)
    latent_channels: int = 4  # latent channels
    norm_num_groups: int = 32  # GroupNorm groups
    sample_size: int = 1024  # training image side; informational
    scaling_factor: float = 0.13025  # latent * it has ~unit variance (SD 1.x/2.x: 0.18215)
    force_upcast: bool = True  # True: overflows in fp16, run in fp32 (see vae_dtype)
    # Fixed by the architecture (not in config.json):
    norm_eps: float = 1e-6  # eps of every GroupNorm in the VAE
    logvar_min: float = -30.0  # log-variance clamp of the latent Gaussian, as trained
    logvar_max: float = 20.0

    def __post_init__(self):
        n = len(self.block_out_channels)
        types = (self.down_block_types, self.up_block_types)
        if types != (("DownEncoderBlock2D",) * n, ("UpDecoderBlock2D",) * n):
            raise ValueError("VAEConfig: only DownEncoderBlock2D / UpDecoderBlock2D levels are "
                             f"implemented, one per entry of block_out_channels ({n}); got {types}")

    @classmethod
    def from_dict(cls, d):
        """Read a diffusers vae/config.json dict; ValueError for features minidream lacks."""
        return read_diffusers_config(cls, d, "VAE")


class VAE(nn.Module):
    """encode(x) -> (mean, logvar) of z; decode(z) -> x. Run in vae_dtype(config, dtype)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z_ch = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * z_ch, 2 * z_ch, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(z_ch, z_ch, kernel_size=1)

    def encode(self, x):
        """Image -> moments of the latent Gaussian: mean and log-variance, each (B, 4, H/8, W/8)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)

    def decode(self, z):
        """Unscaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
