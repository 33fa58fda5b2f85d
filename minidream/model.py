"""The model bundle: UNet + VAE + text encoders + noise schedule. Reading one from disk (a diffusers
folder or a single .safetensors file) is minidream.formats.load_model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minidream.schedule import ScheduleConfig
from minidream.text import TextEncoders


@dataclass
class Model:
    """A loaded diffusion model: everything generate() and training need."""

    unet: torch.nn.Module  # minidream.unet.UNet
    vae: torch.nn.Module  # minidream.vae.VAE
    text: TextEncoders  # tokenizers + CLIP text encoders
    schedule: ScheduleConfig  # the noise schedule it was trained with
    name: str = ""  # where it came from (for messages and image metadata)
    force_zeros_for_empty_prompt: bool = True  # SDXL base: zeros as the unconditional embedding

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE downsamplings), 8 for SD/SDXL."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The image side the UNet was trained at (SDXL: 128 latents * 8 = 1024 px)."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"
