"""The model bundle (UNet + VAE + text encoders + noise schedule), loaded from a diffusers folder or a single
file, and where models are found: without --model, SDXL where the README says to put it, else the bundled tiny one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from transformers import CLIPTokenizer

from minidream.checkpoint import (detect, load_text_encoder, load_unet, load_vae, text_encoder_parts, unet_weights,
                                  vae_weights)
from minidream.errors import UserError
from minidream.loading import CheckpointError, read_json
from minidream.schedule import ScheduleConfig
from minidream.text import TextEncoders
from minidream.unet_config import UNetConfig
from minidream.vae import VAEConfig, vae_dtype

REPO = Path(__file__).resolve().parent.parent
SDXL_LOCATIONS = ("weights/sdxl-base-1.0", "weights/sd_xl_base_1.0.safetensors")  # README: where to download to
BUNDLED_MODEL = "weights/tiny-sdxl"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"


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
    return read_json(path / name) if (path / name).is_file() else {}


# ---------------------------------------------------------------------------------------------
# Tokenizers: SDXL single files carry no vocabulary, so it comes from a diffusers folder.

class TokenizerNotFoundError(UserError):
    """No CLIP tokenizer where one was looked for."""


def _has_tokenizer_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("vocab.json", "merges.txt")) or (folder / "tokenizer.json").is_file()


def find_tokenizer_dir(candidates, need_second: bool = True) -> Path:
    """First folder among `candidates` (None entries skipped) that holds tokenizer/ (and tokenizer_2/)."""
    subfolders = ("tokenizer", "tokenizer_2") if need_second else ("tokenizer",)
    tried = [Path(c) for c in candidates if c is not None]
    for folder in tried:
        if all(_has_tokenizer_files(folder / s) for s in subfolders):
            return folder
    where = ", ".join(map(str, tried)) or "nowhere (no --tokenizer DIR given)"
    names = " and ".join(s + "/" for s in subfolders)
    raise TokenizerNotFoundError(
        f"no CLIP tokenizer found (looked in: {where}). Single-file checkpoints carry none: pass --tokenizer DIR, "
        f"where DIR holds {names} as in https://huggingface.co/{SDXL_REPO}, each with vocab.json + merges.txt + "
        f"tokenizer_config.json + special_tokens_map.json (docs/t4.md shows the download command).")


# ---------------------------------------------------------------------------------------------
# Encoders: config -> meta-device module -> assign the checkpoint's tensors.

def load_text_encoders(path, dtype=torch.float32, device="cpu", *, tokenizer_dir=None, variant=None,
                       expect=None) -> TextEncoders:
    """Tokenizers and frozen CLIP text encoders (SD 1.x / 2.x: one) of a diffusers folder or a single file.
    Tokenizers come from `tokenizer_dir` if given, else the model folder, else the folder holding a single file."""
    path = Path(path)
    parts = text_encoder_parts(path)
    if "text_encoder" not in parts:
        raise CheckpointError(f"{path} is {detect(path).description}: it holds no text encoder")
    sdxl = "text_encoder_2" in parts
    tok_dir = find_tokenizer_dir([tokenizer_dir, path if path.is_dir() else path.parent], need_second=sdxl)

    def encoder(part):  # frozen: minidream trains LoRA on the UNet (text-encoder LoRA adds its own params)
        return load_text_encoder(path, part, dtype, device, expect=expect, variant=variant).eval().requires_grad_(False)

    return TextEncoders(tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir / "tokenizer")),
                        text_encoder=encoder("text_encoder"),
                        tokenizer_2=CLIPTokenizer.from_pretrained(str(tok_dir / "tokenizer_2")) if sdxl else None,
                        text_encoder_2=encoder("text_encoder_2") if sdxl else None)


def load_model(path, dtype=torch.float32, device="cpu", *, vae=None, tokenizer=None, variant=None) -> Model:
    """Load every part of the model at `path` (diffusers folder or single file). vae: an optional separate VAE
    (folder or file), e.g. an fp16-fix one that runs in fp16; tokenizer: a folder with tokenizer/ (and tokenizer_2/)."""
    path = Path(path)
    family = detect(path).family or None
    vae_path = Path(vae) if vae else path
    vae_config = VAEConfig.from_dict(vae_weights(vae_path, expect=family, variant=variant)[0])
    schedule = _folder_json(path, "scheduler/scheduler_config.json")
    index = _folder_json(path, "model_index.json")
    return Model(unet=load_unet(path, dtype, device, expect=family, variant=variant).eval().requires_grad_(False),
                 vae=load_vae(vae_path, vae_dtype(vae_config, dtype), device, expect=family, variant=variant)
                 .eval().requires_grad_(False),
                 text=load_text_encoders(path, dtype, device, tokenizer_dir=tokenizer, variant=variant, expect=family),
                 schedule=ScheduleConfig.from_dict(schedule) if schedule else ScheduleConfig(), name=str(path),
                 force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", family == "sdxl"))


def model_image_size(path) -> int:
    """The model's native image side in px, from config/headers only (nothing loaded)."""
    family = detect(path).family or None
    unet = UNetConfig.from_dict(unet_weights(path, expect=family)[0])
    vae = VAEConfig.from_dict(vae_weights(path, expect=family)[0])
    return unet.sample_size * 2 ** (len(vae.block_out_channels) - 1)
