"""Checkpoints: what a path holds, and loading the UNet, VAE and text encoders from it.

A **diffusers folder** holds `model_index.json` and one folder per part (`unet/`, `vae/`, `text_encoder*/`, ...),
each a `config.json` plus `*.safetensors` weights (or shards listed in `*.safetensors.index.json`). An fp16 copy
(`*.fp16.safetensors`) is read only when `variant="fp16"` is asked for, or when it is all there is. A **single
file** (`sd_xl_base_1.0.safetensors`) is read by minidream.formats.single_file, which registers itself here
(register_file_reader) on `import minidream.formats`. Every load is strict and low-RAM (loading.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minidream.unet import UNet, UNetConfig
from minidream.vae import VAE, VAEConfig
from minidream.loading import (CheckpointError, TensorRef, Weights, load_weights, parameters_on_meta,
                               read_header, read_json, refuse_pickle)

PathLike = Union[str, Path]
FAMILIES = {"sdxl": "an SDXL base model", "sd2": "a Stable Diffusion 2.x model", "sd1": "a Stable Diffusion 1.x model",
            "sdxl-refiner": "an SDXL refiner model (its UNet sees only the OpenCLIP text encoder)",
            "unknown": "a UNet of unknown family"}
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "lora_unet_", "lora_te", "hada_", "lokr_")
# Sizes far beyond any Stable Diffusion model's (SDXL: widths <= 2816, 10 transformer layers, 32 CLIP layers, 4 levels;
# lists hold one value per level, 8 at most). A config.json above them is damaged, and building its model would try
# to allocate terabytes: it is refused first.
SIZE_LIMITS = {"layers_per_block": 64, "transformer_layers_per_block": 64, "num_hidden_layers": 64, "vocab_size": 2**18}
SIZE_LIMITS |= dict.fromkeys(("projection_class_embeddings_input_dim", "max_position_embeddings", "cross_attention_dim",
                              "block_out_channels", "addition_time_embed_dim", "intermediate_size", "latent_channels",
                              "in_channels", "out_channels", "sample_size", "hidden_size", "projection_dim"), 8192)
NULLABLE_SIZES = ("projection_class_embeddings_input_dim", "addition_time_embed_dim", "transformer_layers_per_block",
                  "projection_dim")  # null in SD 1.x / 2.x configs: the feature is off


def build_unet(config: dict) -> nn.Module:
    return UNet(UNetConfig.from_dict(config))


def build_vae(config: dict) -> nn.Module:
    return VAE(VAEConfig.from_dict(config))


def build_text_encoder(config: dict) -> nn.Module:
    """transformers' CLIP text model for `config`: with projection for SDXL's second encoder."""
    projected = "CLIPTextModelWithProjection" in config.get("architectures", ())
    return (CLIPTextModelWithProjection if projected else CLIPTextModel)(CLIPTextConfig.from_dict(config))


def build_on_meta(build, config: dict, what: str) -> nn.Module:
    """`build(config)` on meta (parameters_on_meta); a value the modules refuse is a CheckpointError."""
    try:
        with parameters_on_meta():
            return build(config)
    except (ValueError, TypeError, KeyError, RuntimeError, ArithmeticError) as e:
        raise CheckpointError(f"{what}: its config.json builds no model ({e!r}); fix or re-download it") from None


def check_config(config: dict, part: str, source) -> dict:
    """`config` (unet, vae or text encoder) if its sizes are sane and it parses; else a CheckpointError."""
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        may_be_null = key not in config or key in NULLABLE_SIZES
        if len(values) > 8 or not all(v is None and may_be_null or type(v) is int and 0 < v <= limit for v in values):
            raise CheckpointError(f"{source}: {key}={str(value)[:60]} is no sane size (1 to {limit}, 8 levels); fix it")
    try:
        {"unet": UNetConfig.from_dict, "vae": VAEConfig.from_dict}.get(part, CLIPTextConfig.from_dict)(config)
    except Exception as e:  # noqa: BLE001  (transformers' config checks raise their own types)
        raise CheckpointError(f"{source}: {e}".replace("\n", " ")) from None
    return config


# ---------------------------------------------------------------------------------------------
# What is this path?
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What a path holds, for messages and for choosing how to read it."""

    path: Path
    layout: str  # diffusers | component | single-file | lora | vae-file | unet-file | text-encoder-file | unknown
    description: str  # one phrase a user can read: "an SDXL base model in one file (...)"
    family: str = ""  # sdxl | sdxl-refiner | sd2 | sd1 | unknown; "" when not a whole model
    parts: tuple[str, ...] = ()  # parts present: unet, vae, text_encoder, text_encoder_2, tokenizer, ...
    missing: tuple[str, ...] = ()  # parts model_index.json lists but the folder lacks


def detect(path: PathLike) -> ModelInfo:
    """Say what `path` is (a diffusers folder, a single file, a LoRA, a lone VAE, ...) by its keys."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a diffusers folder or a .safetensors file")
    if path.is_dir():
        return _detect_folder(path)
    header = read_header(path)
    if any(marker in k for k in header for marker in LORA_MARKERS):
        text = f"a LoRA adapter ({len(header)} tensors), not a base model: apply it with --lora"
        return ModelInfo(path, "lora", text)
    return file_reader().describe(path, header)  # a single file, a lone VAE or UNet, ...


def _detect_folder(path: Path) -> ModelInfo:
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                  and all(isinstance(name, str) for name in v) and v[0]]  # "vae": ["diffusers", "AutoencoderKL"]
        present = tuple(k for k in listed if (path / k).is_dir())
        missing = tuple(k for k in listed if k not in present)
        family = _folder_family(path, index, listed)
        text = f"{FAMILIES[family]} in diffusers layout"
        if missing:
            text += f", but without {', '.join(m + '/' for m in missing)} (an incomplete download?)"
        return ModelInfo(path, "diffusers", text, family, present, missing)
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        architectures = config.get("architectures") if isinstance(config.get("architectures"), list) else []
        kind = str(config.get("_class_name") or (architectures or ["?"])[0])
        part = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}.get(kind, "text_encoder")
        family = _family_from_unet_config(config) if part == "unet" else ""
        return ModelInfo(path, "component", f"one {kind} folder (config.json + weights)", family, (part,))
    found = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f"; it holds {', '.join(found[:3])}: give that file instead" if found else ""
    return ModelInfo(path, "unknown", f"not a model folder (no model_index.json or config.json){hint}")


def _family_from_unet_config(config: dict) -> str:
    context_dim = config.get("cross_attention_dim")  # an int in every SD config; anything else: "unknown"
    return family_from_context(context_dim if type(context_dim) is int else 0, config.get("addition_embed_type") == "text_time")


def family_from_context(context_dim: int, has_label_emb: bool) -> str:
    """The family of a UNet alone, from its cross-attention width and whether it has label_emb."""
    if has_label_emb:  # only SDXL adds pooled-text embeddings; its refiner has 1280-wide context
        return "sdxl-refiner" if context_dim == 1280 else "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(context_dim, "unknown")


_FILE_READERS = []  # minidream.formats.single_file's reader, once registered


def register_file_reader(reader) -> None:
    _FILE_READERS[:] = [reader]


def file_reader():
    if not _FILE_READERS:
        raise CheckpointError("single .safetensors checkpoints are read by minidream.formats: "
                              "`import minidream.formats` first (train.py and sample.py do)")
    return _FILE_READERS[0]


def _folder_family(path: Path, index: dict, listed: list[str]) -> str:
    if (path / "unet" / "config.json").is_file():
        family = _family_from_unet_config(read_json(path / "unet" / "config.json"))
        if family != "unknown":
            return family
    pipeline = str(index.get("_class_name", ""))  # small SD 1.x-like test models: the pipeline says it
    if pipeline.startswith("StableDiffusionXL"):
        return "sdxl" if "text_encoder" in listed else "sdxl-refiner"
    return "sd1" if pipeline.startswith("StableDiffusion") else "unknown"


# The layouts that can provide each part
_FOLDERS_AND_FILES = ("diffusers", "component", "single-file")
_ACCEPTS = {"unet": _FOLDERS_AND_FILES, "text_encoder": _FOLDERS_AND_FILES, "vae": (*_FOLDERS_AND_FILES, "vae-file")}


def require(info: ModelInfo, expect: str | None, part: str) -> None:
    """Refuse a path that cannot provide `part`, or holds a model of another family than `expect`."""
    wanted = f"the {part} of {FAMILIES[expect]}" if expect else f"a {part}"
    if info.layout not in _ACCEPTS[part] or (info.layout == "component" and info.parts != (part,)):
        raise CheckpointError(f"{info.path} is {info.description}; {wanted} was expected here")
    if expect and info.family and info.family != expect:
        raise CheckpointError(f"{info.path} is {FAMILIES[info.family]}, but {FAMILIES[expect]} was expected here. "
                              "Give a checkpoint of that family (or load with expect=None to accept any).")


# ---------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------

_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding one part's weights (see the variant rule at the top)."""
    tag = f".{variant or 'fp16'}"

    def is_variant(p: Path) -> bool:  # x.fp16.safetensors, x.fp16-00001-of-00002.safetensors, x.index.fp16.json
        return tag + "." in p.name or tag + "-" in p.name

    for want_variant in [True, False] if variant else [False, True]:
        for index in sorted(folder.glob("*.safetensors.index*.json")):
            if is_variant(index) == want_variant:
                weight_map = read_json(index).get("weight_map")
                shards = sorted(set(map(str, weight_map.values() if isinstance(weight_map, dict) else ["weight_map"])))
                missing = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are not there: {', '.join(missing)}")
                return [folder / s for s in shards]
        files = sorted(folder.glob("*.safetensors"))
        singles = [p for p in files if is_variant(p) == want_variant and not _SHARD.search(p.name)]
        if len(singles) > 1:
            names = ", ".join(p.name for p in singles)
            raise CheckpointError(f"{folder} holds several weight files ({names}); keep one")
        if singles:
            return singles
    for file in sorted(folder.iterdir()):
        refuse_pickle(file)  # no safetensors but a pickle: say why it is not read
    raise CheckpointError(f"{folder} holds no weights: expected diffusion_pytorch_model.safetensors or "
                          "model.safetensors (or their .fp16 variant, or a sharded *.safetensors.index.json)")


def _folder_part(info: ModelInfo, part: str, variant: str | None, config: dict | None = None) -> tuple[dict, Weights]:
    """(`config` or config.json, TensorRefs named as stored) of one part of a diffusers or part folder."""
    folder = info.path / part if info.layout == "diffusers" else info.path
    if info.layout == "diffusers" and part not in info.parts and folder.is_dir():
        raise CheckpointError(f"{info.path / 'model_index.json'} does not list {part}/ as [library, class name] "
                              "(damaged?): fix or re-download model_index.json")
    if info.layout == "diffusers" and part not in info.parts:
        raise CheckpointError(f"{info.path} has no {part}/ folder ({info.description}). Download the whole "
                              f"repository, including {part}/config.json and its weights.")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; download it with the weights")
    weights = {key: TensorRef(file, key, shape) for file in weight_files(folder, variant)
               for key, shape in read_header(file).items()}
    return check_config(config or read_json(folder / "config.json"), part, folder / "config.json"), weights


# ---------------------------------------------------------------------------------------------
# The API the pipeline and the training call
# ---------------------------------------------------------------------------------------------
#
# `expect` is the model family the caller needs ("sdxl" by default, None for any); `variant="fp16"`
# prefers a folder's fp16 files; a `config` dict replaces the config the checkpoint gives or implies
# (for single files that break single_file's head-width rule).


def unet_weights(path: PathLike, *, expect="sdxl", variant=None, config=None) -> tuple[dict, Weights]:
    """(diffusers-style UNet config dict, TensorRefs in minidream's names); reads headers only."""
    info = detect(path)
    require(info, expect, "unet")
    if info.layout == "single-file":
        return file_reader().unet(info, config)
    return _folder_part(info, "unet", variant, config)


def vae_weights(path: PathLike, *, expect="sdxl", variant=None, config=None) -> tuple[dict, Weights]:
    """(AutoencoderKL config dict, TensorRefs); a lone VAE file gets the scaling factor of `expect`."""
    info = detect(path)
    require(info, expect, "vae")
    if info.layout in ("vae-file", "single-file"):
        return file_reader().vae(info, expect, config)
    return _folder_part(info, "vae", variant, config)


def load_unet(path: PathLike, dtype=torch.float32, device="cpu", *, expect="sdxl", variant=None, config=None):
    """The UNet at `path` (diffusers folder or single file), streamed into `dtype` on `device`."""
    config, weights = unet_weights(path, expect=expect, variant=variant, config=config)
    model = build_on_meta(build_unet, config, f"UNet from {path}")
    return load_weights(model, weights, dtype, device, what=f"UNet from {path}")


def load_vae(path: PathLike, dtype=torch.float32, device="cpu", *, expect="sdxl", variant=None, config=None):
    """The VAE of a diffusers folder, a VAE folder, a single file or a lone VAE file."""
    config, weights = vae_weights(path, expect=expect, variant=variant, config=config)
    model = build_on_meta(build_vae, config, f"VAE from {path}")
    return load_weights(model, weights, dtype, device, what=f"VAE from {path}")


def text_encoder_parts(path: PathLike) -> tuple[str, ...]:
    """Which of "text_encoder", "text_encoder_2" the model at `path` has (SDXL: both)."""
    return tuple(p for p in ("text_encoder", "text_encoder_2") if p in detect(path).parts)


def text_encoder_weights(path: PathLike, part="text_encoder", *, expect="sdxl", variant=None) -> tuple[dict, Weights]:
    """(CLIPTextConfig dict, TensorRefs) of text encoder `part`; a folder of one text encoder serves any `part`.
    Names as stored (folders) or transformers 4's `text_model.*` (single files): see fit_text_model_prefix."""
    info = detect(path)
    require(info, expect, "text_encoder")
    if info.layout in ("diffusers", "component"):
        return _folder_part(info, part if info.layout == "diffusers" else "text_encoder", variant)
    return file_reader().text_encoder(info, part)


def fit_text_model_prefix(weights: Weights, model: nn.Module) -> Weights:
    """Add or drop the `text_model.` level so the names in `weights` match `model`'s: transformers 4 names every
    CLIP text tensor `text_model.*` (but `text_projection`), transformers 5's CLIPTextModel has no such level."""
    wants = any(k.startswith("text_model.") for k in model.state_dict())
    has = any(k.startswith("text_model.") for k in weights)
    if wants and not has:
        return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in weights.items()}
    if has and not wants:
        return {k.removeprefix("text_model."): v for k, v in weights.items()}
    return weights


def load_text_encoder(path: PathLike, part="text_encoder", dtype=torch.float32, device="cpu", *, expect="sdxl",
                      variant=None):
    """transformers' CLIP text encoder `part` ("text_encoder" or "text_encoder_2") of `path`."""
    config, weights = text_encoder_weights(path, part, expect=expect, variant=variant)
    model = build_on_meta(build_text_encoder, config, f"{part} from {path}")
    weights = fit_text_model_prefix(weights, model)
    # transformers 4 saved the constant position_ids buffer (0..76) in real repos' text encoders;
    # transformers 5 no longer counts it as state: the model builds its own.
    state = model.state_dict()
    weights = {k: v for k, v in weights.items() if not k.endswith("embeddings.position_ids") or k in state}
    return load_weights(model, weights, dtype, device, what=f"{part} from {path}")

