"""The model bundle (minidream.model.Model) read from a model folder, and where models are found:
without --model, SDXL where the README says to put it, else the bundled tiny one. The package's
load_model and model_image_size (minidream.formats) take any path, single files too."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTokenizer

from minidream.formats import checkpoint
from minidream.formats.checkpoint import load_part
from minidream.errors import UserError
from minidream.formats.loading import CheckpointError, read_json
from minidream.model import Model
from minidream.quant.linear import quantiser
from minidream.schedule import ScheduleConfig
from minidream.text import TextEncoders
from minidream.unet_config import UNetConfig
from minidream.vae import VAEConfig, vae_dtype

REPO = Path(__file__).resolve().parents[2]
SDXL_LOCATIONS = ("weights/sdxl-base-1.0", "weights/sd_xl_base_1.0.safetensors")  # see README
BUNDLED_MODEL = "weights/tiny-sdxl"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"


def default_model_path() -> tuple[Path, str]:
    """(path, why): the SDXL base model if downloaded to weights/, else the bundled tiny one."""
    for location in SDXL_LOCATIONS:
        if (REPO / location).exists():
            return REPO / location, f"SDXL base found at {location}"
    why = f"for real photos put SDXL at {SDXL_LOCATIONS[0]} (README: 'Real SDXL on a GPU')"
    return REPO / BUNDLED_MODEL, f"the bundled tiny model, trained on the toy world; {why}"


def _folder_json(path: Path, name: str) -> dict:
    return read_json(path / name) if (path / name).is_file() else {}


# ---------------------------------------------------------------------------------------------
# Tokenizers: SDXL single files carry no vocabulary, so it comes from a diffusers folder.

class TokenizerNotFoundError(UserError):
    """No CLIP tokenizer where one was looked for."""


def _has_tokenizer_files(folder: Path) -> bool:
    vocab = all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))
    return vocab or (folder / "tokenizer.json").is_file()


def find_tokenizer_dir(candidates, need_second: bool = True) -> Path:
    """First folder among `candidates` (None skipped) that holds tokenizer/ (and tokenizer_2/)."""
    subfolders = ("tokenizer", "tokenizer_2") if need_second else ("tokenizer",)
    tried = [Path(c) for c in candidates if c is not None]
    for folder in tried:
        if all(_has_tokenizer_files(folder / s) for s in subfolders):
            return folder
    where = ", ".join(map(str, tried)) or "nowhere (no --tokenizer DIR given)"
    raise TokenizerNotFoundError(
        f"no CLIP tokenizer found (looked in: {where}). Single-file checkpoints carry none: pass "
        f"--tokenizer DIR, where DIR holds {' and '.join(s + '/' for s in subfolders)} as in "
        f"https://huggingface.co/{SDXL_REPO}, each with vocab.json + merges.txt + "
        "tokenizer_config.json + special_tokens_map.json (docs/gpus.md shows the download command).")


# ---------------------------------------------------------------------------------------------
# Loading. A `reader` is a module whose detect, unet_weights, vae_weights and text_encoder_weights
# read the path given: checkpoint.py reads folders, single_file.py files.

def load_text_encoders(path, dtype=torch.float32, device="cpu", *, tokenizer_dir=None, variant=None,
                       expect=None, reader=checkpoint) -> TextEncoders:
    """Tokenizers and frozen CLIP text encoders (SD 1.x / 2.x: one) of the model at `path`; the
    tokenizers of `tokenizer_dir`, else of the model folder, else of the folder holding the file."""
    path, info = Path(path), reader.detect(path)
    if "text_encoder" not in info.parts:
        raise CheckpointError(f"{path} is {info.description}: it holds no text encoder")
    sdxl = "text_encoder_2" in info.parts
    found = find_tokenizer_dir([tokenizer_dir, path if path.is_dir() else path.parent], sdxl)

    def encoder(part):  # frozen: minidream trains LoRA on the UNet (text-encoder LoRA adds its own)
        weights = reader.text_encoder_weights(path, part, expect=expect, variant=variant)
        return load_part(part, path, *weights, dtype, device).eval().requires_grad_(False)

    def tokenizer(part):
        return CLIPTokenizer.from_pretrained(str(found / part))

    return TextEncoders(tokenizer=tokenizer("tokenizer"), text_encoder=encoder("text_encoder"),
                        tokenizer_2=tokenizer("tokenizer_2") if sdxl else None,
                        text_encoder_2=encoder("text_encoder_2") if sdxl else None)


def load_model(path, dtype=torch.float32, device="cpu", *, vae=None, tokenizer=None, variant=None,
               base_weights="fp16"):
    """Every part of the model folder `path` (a single file: minidream.formats.load_model). vae: a
    separate VAE folder, e.g. an fp16-fix one; tokenizer: a folder holding tokenizer/ (tokenizer_2/)
    to use before the model's own; base_weights: "fp16" (the UNet in `dtype`), "int8" or "nf4" (its
    Linear weights quantised as they are read, minidream/quant)."""
    return read_model(checkpoint, checkpoint, path, dtype, device, vae=vae, tokenizer=tokenizer,
                      variant=variant, base_weights=base_weights)


def read_model(reader, vae_reader, path, dtype, device, *, vae, tokenizer, variant,
               base_weights="fp16") -> Model:
    """load_model with `reader` reading `path` and `vae_reader` reading `vae` (or `path`)."""
    path, vae_path = Path(path), Path(vae or path)
    family = reader.detect(path).family or None
    vae_config, vae_weights = vae_reader.vae_weights(vae_path, expect=family, variant=variant)
    unet_weights = reader.unet_weights(path, expect=family, variant=variant)
    quantise = quantiser(base_weights)  # None for fp16
    unet = load_part("unet", path, *unet_weights, dtype, device, quantise)
    unet.eval().requires_grad_(False)
    runs_in = vae_dtype(VAEConfig.from_dict(vae_config), dtype)  # fp32 for fp16 unless fp16-safe
    vae = load_part("vae", vae_path, vae_config, vae_weights, runs_in, device)
    text = load_text_encoders(path, dtype, device, tokenizer_dir=tokenizer, variant=variant,
                              expect=family, reader=reader)
    schedule = _folder_json(path, "scheduler/scheduler_config.json")
    index = _folder_json(path, "model_index.json")
    zeros = index.get("force_zeros_for_empty_prompt", family == "sdxl")  # SDXL base: True
    return Model(unet=unet, vae=vae.eval().requires_grad_(False), text=text, name=str(path),
                 schedule=ScheduleConfig.from_dict(schedule) if schedule else ScheduleConfig(),
                 force_zeros_for_empty_prompt=zeros)


def model_image_size(path) -> int:
    """The native image side in px of the model folder `path`, from its configs (nothing loaded)."""
    return image_size(checkpoint, path)


def image_size(reader, path) -> int:
    """model_image_size with `reader` reading `path`."""
    family = reader.detect(path).family or None
    unet = UNetConfig.from_dict(reader.unet_weights(path, expect=family)[0])
    vae = VAEConfig.from_dict(reader.vae_weights(path, expect=family)[0])
    return unet.sample_size * 2 ** (len(vae.block_out_channels) - 1)
