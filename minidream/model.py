"""The model bundle (UNet + VAE + text encoders + noise schedule) and where models are found.

`load_model(path)` takes a diffusers folder or a single .safetensors file. Without --model the
CLIs use the real SDXL base model where the README tells users to put it, and fall back to the
tiny model bundled in weights/tiny-sdxl, which runs on any CPU in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minidream.checkpoint import detect, load_unet, load_vae, vae_weights
from minidream.lora import merge_lora
from minidream.lora_files import load_lora
from minidream.schedule import ScheduleConfig
from minidream.text import TextEncoders, load_text_encoders
from minidream.vae import VAEConfig, vae_dtype

REPO = Path(__file__).resolve().parent.parent
SDXL_LOCATIONS = ("weights/sdxl-base-1.0", "weights/sd_xl_base_1.0.safetensors")  # README: where to download to
BUNDLED_MODEL = "weights/tiny-sdxl"


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


def default_model_path() -> tuple[Path, str]:
    """(path, why): the real SDXL base model if downloaded to weights/, else the bundled tiny one."""
    for location in SDXL_LOCATIONS:
        if (REPO / location).exists():
            return REPO / location, f"SDXL base found at {location}"
    return REPO / BUNDLED_MODEL, (f"the bundled tiny model, trained on the toy world; for real photos put SDXL at "
                                  f"{SDXL_LOCATIONS[0]} (README: 'Real SDXL on a T4')")


def _folder_json(path: Path, name: str) -> dict:
    file = path / name
    return json.loads(file.read_text()) if path.is_dir() and file.is_file() else {}


def load_model(path, dtype=torch.float32, device="cpu", *, vae=None, tokenizer=None, variant=None) -> Model:
    """Load every part of the model at `path` (diffusers folder or single file).

    vae: an optional separate VAE (folder or file), e.g. an fp16-fix VAE that can run in fp16.
    tokenizer: a folder with tokenizer/ (and tokenizer_2/), needed for single files.
    The VAE is loaded in fp32 when fp16 was asked for and it would overflow (see vae.vae_dtype).
    """
    path = Path(path)
    family = detect(path).family or None
    vae_path = Path(vae) if vae else path
    vae_config = VAEConfig.from_dict(vae_weights(vae_path, expect=family, variant=variant)[0])
    schedule = _folder_json(path, "scheduler/scheduler_config.json")
    index = _folder_json(path, "model_index.json")
    return Model(
        unet=load_unet(path, dtype, device, expect=family, variant=variant).eval().requires_grad_(False),
        vae=load_vae(vae_path, vae_dtype(vae_config, dtype), device, expect=family, variant=variant)
        .eval().requires_grad_(False),
        text=load_text_encoders(path, dtype, device, tokenizer_dir=tokenizer, variant=variant, expect=family),
        schedule=ScheduleConfig.from_dict(schedule) if schedule else ScheduleConfig(),
        name=str(path),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", family == "sdxl"),
    )


def add_loras(model: Model, loras, fuse: bool = True) -> list[str]:
    """Apply LoRA files to the model: `loras` is [(path, scale), ...]; returns the adapter names.

    Each file may hold UNet and text-encoder adapters (diffusers or kohya layout, see lora_files);
    every key must fit, or nothing of that file is loaded. fuse=True folds all of them into the
    base weights (W += scale * B A * alpha / r, lora.merge_lora), so sampling runs plain matmuls
    at the base model's speed; unmerge_lora undoes it.
    """
    text = model.text
    names = []
    for i, (path, scale) in enumerate(loras):
        names.append(load_lora(path, unet=model.unet, text_encoder=text.text_encoder,
                               text_encoder_2=text.text_encoder_2, name=f"lora{i}", scale=scale))
    if fuse:
        for module in (model.unet, text.text_encoder, text.text_encoder_2):
            if module is not None:
                merge_lora(module)
    return names
