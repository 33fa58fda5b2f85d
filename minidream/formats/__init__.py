"""Everything read from or written to disk in a model's layouts, and model loading for ANY path.

checkpoint.py and models.py read diffusers folders (and one part's folder) only. To
accept a single .safetensors checkpoint too (sd_xl_base_1.0.safetensors; a lone VAE file as --vae),
call the functions here instead: each takes the arguments of the core's function of the same name
and chooses by what the path holds, a file -> single_file.py, a folder -> checkpoint.py.

    load_model, model_image_size, default_model_path   a whole model (train.py, sample.py)
    detect                                          what a path holds (a LoRA, a lone VAE, ...)
    load_unet, load_vae, load_text_encoder          one part, streamed into a dtype and device
    unet_weights, vae_weights, text_encoder_weights (config dict, TensorRefs); headers only
    text_encoder_parts                              "text_encoder" and/or "text_encoder_2"

The modules:

    checkpoint.py    diffusers model folders: what a folder holds, each part's config and weights
    loading.py       strict, low-RAM safetensors loading into a module built on `meta`; no pickles
    models.py        the whole model bundle from a folder, tokenizers, the default model
    single_file.py   sd_xl_base_1.0.safetensors-style files: parts, architecture from shapes
    sgm_keys.py      their tensor names (Stability's sgm / CompVis' ldm) -> minidream's names
    lora_files.py    LoRA files in diffusers, older diffusers, kohya/ComfyUI layouts; loading, fusing
    lora_stack.py    several named adapters on a layer (LoRA files): merged, unmerged, removed
    lora_weights.py  moving adapter weights between files and a model's LoRA layers
    model_folder.py  writing a fully fine-tuned model as a diffusers folder
    archives.py      a .zip of class images, checked and unpacked
"""

from __future__ import annotations

from pathlib import Path

import torch

from minidream.formats import checkpoint, models, single_file
from minidream.formats.checkpoint import ModelInfo, PartWeights, load_part
from minidream.quant.linear import quantiser


def reader_for(path):
    """The module that reads `path`: single_file.py for a file, checkpoint.py otherwise."""
    return single_file if Path(path).is_file() else checkpoint


def load_model(path, dtype=torch.float32, device="cpu", *, vae=None, tokenizer=None, variant=None,
               base_weights="fp16"):
    """models.load_model for a folder or a single file; `vae` too may be either. base_weights:
    "fp16" (the UNet in `dtype`), "int8" or "nf4" (quantised while read, minidream/quant)."""
    return models.read_model(reader_for(path), reader_for(vae or path), path, dtype, device, vae=vae,
                            tokenizer=tokenizer, variant=variant, base_weights=base_weights)


def default_model_path() -> tuple[Path, str]:
    """models.default_model_path: SDXL in weights/ (a folder or the single file), else the bundled
    tiny model."""
    return models.default_model_path()


def model_image_size(path) -> int:
    """The native image side in px of the model at `path`, from configs or headers only."""
    return models.image_size(reader_for(path), path)


def detect(path) -> ModelInfo:
    return reader_for(path).detect(path)


def text_encoder_parts(path) -> tuple[str, ...]:
    """Which of "text_encoder", "text_encoder_2" the model at `path` has (SDXL: both)."""
    return tuple(p for p in ("text_encoder", "text_encoder_2") if p in detect(path).parts)


def unet_weights(path, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    return reader_for(path).unet_weights(path, expect=expect, variant=variant, config=config)


def vae_weights(path, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    return reader_for(path).vae_weights(path, expect=expect, variant=variant, config=config)


def text_encoder_weights(path, part="text_encoder", *, expect="sdxl", variant=None) -> PartWeights:
    return reader_for(path).text_encoder_weights(path, part, expect=expect, variant=variant)


def load_unet(path, dtype=torch.float32, device="cpu", *, expect="sdxl", variant=None, config=None,
              base_weights="fp16"):
    """The UNet at `path`, streamed into `dtype` on `device` (checkpoint.load_part); base_weights
    "int8" / "nf4": its Linear weights quantised as they are read (minidream/quant)."""
    found = unet_weights(path, expect=expect, variant=variant, config=config)
    return load_part("unet", path, *found, dtype, device, quantiser(base_weights))


def load_vae(path, dtype=torch.float32, device="cpu", *, expect="sdxl", variant=None, config=None):
    """The VAE of a model folder or file, of a VAE folder, or of a lone VAE file."""
    found = vae_weights(path, expect=expect, variant=variant, config=config)
    return load_part("vae", path, *found, dtype, device)


def load_text_encoder(path, part="text_encoder", dtype=torch.float32, device="cpu", *,
                      expect="sdxl", variant=None):
    """transformers' CLIP text encoder `part` ("text_encoder" or "text_encoder_2") of `path`."""
    found = text_encoder_weights(path, part, expect=expect, variant=variant)
    return load_part(part, path, *found, dtype, device)
