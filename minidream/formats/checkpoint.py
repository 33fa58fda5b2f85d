"""Checkpoints: what a model folder holds, and reading and loading its UNet, VAE, text encoders.

A **diffusers folder** holds `model_index.json` and one folder per part (`unet/`, `vae/`,
`text_encoder*/`, ...), each a `config.json` plus `*.safetensors` weights (or shards listed in
`*.safetensors.index.json`); one part's folder alone works too. An fp16 copy (`*.fp16.safetensors`)
is read only when `variant="fp16"` is asked for, or when it is all there is. **Single files**
(`sd_xl_base_1.0.safetensors`) are read by single_file.py; the package's functions of the same names
take any path. Every load is strict and low-RAM (loading.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minidream.unet import UNet, UNetConfig
from minidream.vae import VAE, VAEConfig
from minidream.formats.loading import (CheckpointError, TensorRef, Weights, load_weights,
                               parameters_on_meta, read_header, read_json, refuse_pickle)

PartWeights = tuple[dict, Weights]  # (config dict, where each of the part's tensors is on disk)
FAMILIES = {"sdxl": "an SDXL base model", "sd2": "a Stable Diffusion 2.x model",
            "sd1": "a Stable Diffusion 1.x model", "unknown": "a UNet of unknown family",
            "sdxl-refiner": "an SDXL refiner model (its UNet sees only the OpenCLIP text encoder)"}
# Sizes far beyond any Stable Diffusion model's (SDXL: widths <= 2816, 10 transformer layers, 32
# CLIP layers, 4 levels; lists hold one value per level, 8 at most). A config.json above them is
# damaged, and building its model would try to allocate terabytes: it is refused first.
SIZE_LIMITS = {"layers_per_block": 64, "transformer_layers_per_block": 64, "num_hidden_layers": 64,
               "vocab_size": 2**18}
SIZE_LIMITS |= dict.fromkeys((
    "projection_class_embeddings_input_dim", "max_position_embeddings", "cross_attention_dim",
    "block_out_channels", "addition_time_embed_dim", "intermediate_size", "latent_channels",
    "in_channels", "out_channels", "sample_size", "hidden_size", "projection_dim"), 8192)
NULLABLE_SIZES = ("projection_class_embeddings_input_dim", "addition_time_embed_dim",
                  "transformer_layers_per_block", "projection_dim")  # null in SD 1/2: feature off


def build_unet(config: dict) -> nn.Module:
    return UNet(UNetConfig.from_dict(config))


def build_vae(config: dict) -> nn.Module:
    return VAE(VAEConfig.from_dict(config))


def build_text_encoder(config: dict) -> nn.Module:
    """transformers' CLIP text model for `config`: with projection for SDXL's second encoder."""
    projected = "CLIPTextModelWithProjection" in config.get("architectures", ())
    model = CLIPTextModelWithProjection if projected else CLIPTextModel
    return model(CLIPTextConfig.from_dict(config))


def check_config(config: dict, part: str, source) -> dict:
    """`config` (unet, vae or text encoder) if its sizes are sane and it parses, else an error."""
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        nullable = key not in config or key in NULLABLE_SIZES
        if len(values) > 8 or not all(v is None and nullable or type(v) is int and 0 < v <= limit
                                      for v in values):
            raise CheckpointError(f"{source}: {key}={str(value)[:60]} is no sane size "
                                  f"(1 to {limit}, 8 levels); fix it")
    try:
        {"unet": UNetConfig, "vae": VAEConfig}.get(part, CLIPTextConfig).from_dict(config)
    except Exception as e:  # noqa: BLE001  (transformers' config checks raise their own types)
        raise CheckpointError(f"{source}: {e}".replace("\n", " ")) from None
    return config


# ---------------------------------------------------------------------------------------------
# What is this folder?
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What a path holds, for messages and for choosing how to read it."""

    path: Path
    # folders: diffusers | component | unknown; files (minidream.formats): single-file | vae-file |
    # unet-file | text-encoder-file | lora | unknown
    layout: str
    description: str  # one phrase a user can read: "an SDXL base model in diffusers layout"
    family: str = ""  # sdxl | sdxl-refiner | sd2 | sd1 | unknown; "" when not a whole model
    parts: tuple[str, ...] = ()  # parts present: unet, vae, text_encoder, text_encoder_2, ...
    missing: tuple[str, ...] = ()  # parts model_index.json lists but the folder lacks


def detect(path) -> ModelInfo:
    """Say what folder `path` is: a diffusers model, one part (config.json + weights) or neither."""
    path = Path(path)
    if not path.is_dir():
        refuse_pickle(path)
        raise CheckpointError(
            f"{path} is a file: minidream.formats.checkpoint reads model folders; single-file "
            "checkpoints are read by minidream.formats.load_model (and formats.detect, "
            "load_unet, ...)" if path.exists() else
            f"{path} does not exist; give a diffusers folder or a .safetensors file")
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        # parts are listed as [library, class name]: "vae": ["diffusers", "AutoencoderKL"]
        listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                  and len(v) == 2 and all(isinstance(name, str) for name in v) and v[0]]
        present = tuple(k for k in listed if (path / k).is_dir())
        missing = tuple(k for k in listed if k not in present)
        family = _folder_family(path, index, listed)
        gone = f", but without {', '.join(m + '/' for m in missing)} (an incomplete download?)"
        text = f"{FAMILIES[family]} in diffusers layout{gone if missing else ''}"
        return ModelInfo(path, "diffusers", text, family, present, missing)
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        arch = config.get("architectures")  # transformers' configs: [class name]
        kind = str(config.get("_class_name") or isinstance(arch, list) and arch and arch[0] or "?")
        part = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}.get(kind, "text_encoder")
        family = _family_from_unet_config(config) if part == "unet" else ""
        text = f"one {kind} folder (config.json + weights)"
        return ModelInfo(path, "component", text, family, (part,))
    text = "not a model folder (no model_index.json or config.json)"
    found = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f"; it holds {', '.join(found[:3])}: give that file instead" if found else ""
    return ModelInfo(path, "unknown", text + hint)


def _family_from_unet_config(config: dict) -> str:
    width = config.get("cross_attention_dim")  # an int in every SD config; anything else: "unknown"
    has_label_emb = config.get("addition_embed_type") == "text_time"
    return family_from_context(width if type(width) is int else 0, has_label_emb)


def family_from_context(context_dim: int, has_label_emb: bool) -> str:
    """The family of a UNet alone, from its cross-attention width and whether it has label_emb."""
    if has_label_emb:  # only SDXL adds pooled-text embeddings; its refiner has 1280-wide context
        return "sdxl-refiner" if context_dim == 1280 else "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(context_dim, "unknown")


def _folder_family(path: Path, index: dict, listed: list[str]) -> str:
    if (path / "unet" / "config.json").is_file():
        family = _family_from_unet_config(read_json(path / "unet" / "config.json"))
        if family != "unknown":
            return family
    pipeline = str(index.get("_class_name", ""))  # small SD 1.x-like test models: it tells
    if pipeline.startswith("StableDiffusionXL"):
        return "sdxl" if "text_encoder" in listed else "sdxl-refiner"
    return "sd1" if pipeline.startswith("StableDiffusion") else "unknown"


def require(info: ModelInfo, expect: str | None, part: str, layouts=("diffusers", "component")):
    """Refuse a path that cannot provide `part` (a layout not in `layouts`, a folder of another
    part) or holds a model of another family than `expect`."""
    wanted = f"the {part} of {FAMILIES[expect]}" if expect else f"a {part}"
    if info.layout not in layouts or (info.layout == "component" and info.parts != (part,)):
        raise CheckpointError(f"{info.path} is {info.description}; {wanted} was expected here")
    if expect and info.family and info.family != expect:
        raise CheckpointError(f"{info.path} is {FAMILIES[info.family]}, but {FAMILIES[expect]} was "
                              "expected here. Give a checkpoint of that family (or load with "
                              "expect=None to accept any).")


# ---------------------------------------------------------------------------------------------
# Reading a folder's parts. `expect` is the model family the caller needs ("sdxl" by default, None
# for any); `variant="fp16"` prefers a folder's fp16 files; a `config` dict replaces config.json.
# minidream.formats has these functions for any path.
# ---------------------------------------------------------------------------------------------

_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding one part's weights (see the variant rule at the top)."""
    tag = f".{variant or 'fp16'}"

    def is_variant(p: Path) -> bool:  # x.fp16.safetensors, x.fp16-00001-of-00002.safetensors, ...
        return tag + "." in p.name or tag + "-" in p.name  # ... and x.safetensors.index.fp16.json

    for want_variant in [True, False] if variant else [False, True]:
        for index in sorted(folder.glob("*.safetensors.index*.json")):
            if is_variant(index) == want_variant:
                weight_map = read_json(index).get("weight_map")
                listed = weight_map.values() if isinstance(weight_map, dict) else ["weight_map"]
                shards = sorted(set(map(str, listed)))
                missing = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are not there: "
                                          + ", ".join(missing))
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
    raise CheckpointError(f"{folder} holds no weights: expected diffusion_pytorch_model.safetensors"
                          " or model.safetensors (or their .fp16 variant, or a sharded "
                          "*.safetensors.index.json)")


def part_weights(path, part: str, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    """(`config` or config.json, TensorRefs named as stored) of `part` ("unet", "vae",
    "text_encoder", "text_encoder_2") of a diffusers folder, or of a folder holding that part alone
    (a text encoder's serves either). Reads headers only."""
    info = detect(path)
    require(info, expect, part.removesuffix("_2"))
    folder = info.path / part if info.layout == "diffusers" else info.path
    if info.layout == "diffusers" and part not in info.parts:
        raise CheckpointError(
            f"{info.path / 'model_index.json'} does not list {part}/ as [library, class name] "
            "(damaged?): fix or re-download model_index.json" if folder.is_dir() else
            f"{info.path} has no {part}/ folder ({info.description}). Download the whole "
            f"repository, including {part}/config.json and its weights.")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; download it with the weights")
    weights = {key: TensorRef(file, key, shape) for file in weight_files(folder, variant)
               for key, shape in read_header(file).items()}
    config = check_config(config or read_json(folder / "config.json"), part, folder / "config.json")
    return config, weights


def unet_weights(path, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    return part_weights(path, "unet", expect=expect, variant=variant, config=config)


def vae_weights(path, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    return part_weights(path, "vae", expect=expect, variant=variant, config=config)


def text_encoder_weights(path, part="text_encoder", *, expect="sdxl", variant=None) -> PartWeights:
    return part_weights(path, part, expect=expect, variant=variant)  # names: see fit_text_names


# ---------------------------------------------------------------------------------------------
# Loading: config -> module on meta -> its tensors streamed in
# ---------------------------------------------------------------------------------------------


def fit_text_names(weights: Weights, model: nn.Module) -> Weights:
    """A CLIP text encoder's `weights` named as `model` names them: transformers 4 puts every tensor
    but `text_projection` under `text_model.`, transformers 5 has no such level. transformers 4 also
    saved the constant position_ids buffer (0..76), which transformers 5 builds itself: dropped."""
    state = model.state_dict()
    wants, has = (any(k.startswith("text_model.") for k in names) for names in (state, weights))
    if wants and not has:
        weights = {(k if k.startswith("text_projection") else "text_model." + k): v
                   for k, v in weights.items()}
    elif has and not wants:
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return {k: v for k, v in weights.items() if k in state or not k.endswith("position_ids")}


def load_part(part: str, source, config: dict, weights: Weights, dtype=torch.float32, device="cpu",
              quantise=None):
    """Module `part` ("unet", "vae", "text_encoder" or "text_encoder_2") of `source`, built from
    `config` on meta (parameters_on_meta), then filled with `weights` in `dtype` on `device`,
    its Linear weights passed to `quantise` if given (loading.load_weights)."""
    what = f"{ {'unet': 'UNet', 'vae': 'VAE'}.get(part, part)} from {source}"
    build = {"unet": build_unet, "vae": build_vae}.get(part, build_text_encoder)
    try:
        with parameters_on_meta():
            model = build(config)
    except (ValueError, TypeError, KeyError, RuntimeError, ArithmeticError) as e:
        error = f"{what}: its config.json builds no model ({e!r})"
        raise CheckpointError(error + "; fix or re-download it") from None
    weights = fit_text_names(weights, model) if part.startswith("text_encoder") else weights
    return load_weights(model, weights, dtype, device, what=what, quantise=quantise)
