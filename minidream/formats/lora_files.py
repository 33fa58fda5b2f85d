"""LoRA adapter files (safetensors only): the layouts diffusers and kohya (ComfyUI, A1111) use.

An adapter file holds, for each adapted module, a down (A) and an up (B) matrix and an alpha.
Tools disagree on how to spell that:

  "diffusers"      unet.<module>.lora_A.weight / .lora_B.weight; text encoders under
                   text_encoder. / text_encoder_2. (CLIP names with "text_model."). alpha is not a
                   tensor: diffusers' load_lora_weights reads each component's peft LoraConfig
                   (r, lora_alpha, alpha_pattern, ...) from the JSON metadata entry
                   "lora_adapter_metadata", keys prefixed "unet." etc. Without it, alpha = rank.
  "diffusers_old"  unet.<module>.lora.down.weight / .lora.up.weight (what diffusers' training
                   scripts wrote), text encoders ...q_proj.lora_linear_layer.down.weight, and the
                   older attention-processor spelling ...attn1.processor.to_q_lora.down.weight.
  "kohya"          lora_unet_<module with _ for .>.lora_down.weight / .lora_up.weight / .alpha;
                   text encoders lora_te1_ / lora_te2_ (lora_te_ for SD 1.x's single encoder).
                   ComfyUI and A1111 read the UNet module names either in diffusers spelling
                   (down_blocks_1_attentions_0_...) or in SGM spelling (input_blocks_4_1_...).
  "kohya_sgm"      kohya with SGM UNet names, what kohya's sd-scripts write for SDXL.

DoRA files (methods/dora.py) add a magnitude per module: <module>.lora_magnitude_vector (peft:
(out,) for Linear, (1, out, 1, 1) for Conv2d; metadata use_dora) or kohya's <stem>.dora_scale
(LyCORIS: (out, 1[, 1, 1]), or (1, in[, 1, 1]) for a file normalising input channels).

Writing defaults to "diffusers" (rank and alpha survive a diffusers round trip); "kohya" is for
ComfyUI/A1111, which ignore diffusers' metadata and would otherwise apply alpha = rank. Reading
detects the layout from the keys, and every key must land on a module of the given models.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from minidream.formats.loading import widen_float8
from minidream.lora_file import LoRAWeights
from minidream.formats.lora_stack import merge_lora
from minidream.quant.linear import quantised_layers
from minidream.formats.lora_weights import DoRAWeights, LoRAFileError, check_adapter_weights, load_adapter_weights, mismatch_error
from minidream.lora_file import DIFFUSERS_METADATA_KEY, diffusers_tensors, file_module_name
from minidream.lora_file import save_lora as save_diffusers_layout
from minidream.formats.sgm_keys import sgm_unet_name

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LAYOUTS = ("diffusers", "diffusers_old", "kohya", "kohya_sgm")
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


# ----------------------------------------------------------------------------------------------
# SGM names: kohya's SDXL files name UNet modules as the original (SGM) code does.


def unet_module_to_sgm(path: str, unet: nn.Module) -> str:
    """diffusers UNet module path -> SGM (single-file) module path, through checkpoint's key map:
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" -> "input_blocks.4.1.transformer_blocks.0.attn1.to_q".
    Reading needs only this direction: a flattened key (input_blocks_4_1_...) cannot be split back
    into dotted names, so the loader indexes the model's own modules under their SGM names."""
    layers = set(unet.config.per_level()[0])
    if len(layers) != 1:
        raise ValueError("SGM names need the same number of resnets at every level")
    config = {"layers_per_block": layers.pop(), "up_block_types": unet.config.up_block_types}
    return sgm_unet_name(path, config)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class LoRAFile:
    layout: str
    # component -> module name as the file spells it (dotted, or flattened for kohya) -> weights
    adapters: dict[str, dict[str, LoRAWeights]]
    metadata: dict[str, str] = field(default_factory=dict)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file, with errors that say what's wrong."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: widen_float8(f.get_tensor(k)) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip or pickle: torch.save
            raise LoRAFileError(f"{path} is a pickled PyTorch checkpoint (.ckpt/.pt/.bin), not "
                             "safetensors; minidream reads LoRAs only from .safetensors files") from e
        raise LoRAFileError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from e
    if not tensors:
        raise LoRAFileError(f"{path} holds no tensors; it is not a LoRA file")
    return tensors, metadata


def read_lora(path) -> LoRAFile:
    """Read and parse a LoRA file in any supported layout (detected from its keys)."""
    tensors, metadata = read_safetensors(path)
    layout = detect_layout(tensors.keys(), source=str(path))
    if layout.startswith("kohya"):
        parts = _parse_kohya(tensors)
        alphas = lambda component, module, rank: float(rank)  # noqa: E731  (kohya: no alpha = rank)
    else:
        parts, alphas = _parse_diffusers(tensors, layout), _diffusers_alphas(metadata, path)
    kohya = layout.startswith("kohya")
    return LoRAFile(layout, _assemble(parts, alphas, path, kohya), metadata)


def _key_kind(key: str) -> str:
    if _KOHYA_PATTERN.fullmatch(key):
        return "kohya"
    if ".lora_A." in key or ".lora_B." in key or _MAGNITUDE_PATTERN.fullmatch(key):
        return "diffusers"
    if re.search(r"\.lora\.(down|up)\.|\.lora_linear_layer\.|_lora\.(down|up)\.", key):
        return "diffusers_old"
    if key.endswith(".alpha"):
        return "alpha"  # a per-module alpha; fits both diffusers spellings
    return "unknown"


def detect_layout(keys, source: str = "the LoRA") -> str:
    """One of LAYOUTS, decided from the tensor names; unknown or mixed spellings are an error."""
    keys = list(keys)
    if set(keys) == {"clip_l", "clip_g"} or (len(keys) == 1 and "." not in keys[0]):  # SDXL's, A1111's, diffusers
        raise LoRAFileError(f"{source} is a textual-inversion embedding ({', '.join(keys)[:80]}), not a LoRA: "
                            "pass it with --embedding")
    kinds = defaultdict(list)
    for k in keys:
        kinds[_key_kind(k)].append(k)
    if "unknown" in kinds:
        raise mismatch_error(kinds["unknown"], "any LoRA layout",
                             f"{source} is not a LoRA file minidream can read (LyCORIS/LoHa keys?)")
    layouts = sorted(set(kinds) - {"alpha"})
    if len(layouts) != 1:
        raise LoRAFileError(f"{source} mixes LoRA key layouts {layouts or ['alpha only']}; expected one")
    if layouts[0] == "kohya":
        unet_keys = [k for k in keys if k.startswith("lora_unet_")]
        return "kohya_sgm" if any(b in k for k in unet_keys for b in SGM_BLOCKS) else "kohya"
    return layouts[0]


def _split_component(key: str) -> tuple[str, str]:
    for component in ("text_encoder_2", "text_encoder", "unet"):
        if key.startswith(component + "."):
            return component, key[len(component) + 1:]
    return "unet", key  # UNet-only files (peft's own save, save_attn_procs) carry no prefix


_DIFFUSERS_PATTERNS = {
    "diffusers": re.compile(r"(?P<module>.+)\.lora_(?P<part>A|B)\.weight"),
    "diffusers_old": re.compile(r"(?P<module>.+?)\.(lora|lora_linear_layer)\.(?P<part>down|up)\.weight"),
}
# The attention-processor spelling names the projection inside the key: to_q_lora, to_out_lora.
_PROCESSOR_PATTERN = re.compile(r"(?P<parent>.+?)(\.processor)?\.to_(?P<proj>q|k|v|out)_lora\.(?P<part>down|up)\.weight")
_PROCESSOR_PROJ = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                   "text": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
_PART = {"A": "down", "B": "up", "down": "down", "up": "up"}
_MAGNITUDE_PATTERN = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(\.weight)?")  # DoRA's m


def _parse_diffusers(tensors, layout) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        component, rest = _split_component(key)
        if rest.endswith(".alpha"):
            parts[component, rest[: -len(".alpha")]]["alpha"] = tensor
            continue
        m = _MAGNITUDE_PATTERN.fullmatch(rest) if layout == "diffusers" else None
        if m:
            parts[component, m["module"]]["magnitude"] = tensor
            continue
        m = _DIFFUSERS_PATTERNS[layout].fullmatch(rest)
        if m:
            parts[component, m["module"]][_PART[m["part"]]] = tensor
            continue
        m = _PROCESSOR_PATTERN.fullmatch(rest) if layout == "diffusers_old" else None
        if m is None:
            raise LoRAFileError(f"LoRA key {key!r} is not in the {layout} layout of the other keys")
        projections = _PROCESSOR_PROJ["unet" if component == "unet" else "text"]
        parts[component, f"{m['parent']}.{projections[m['proj']]}"][m["part"]] = tensor
    return parts


def _diffusers_alphas(metadata: dict[str, str], path):
    """alpha for (component, module, rank) from diffusers' per-component LoraConfig metadata."""
    config = _lora_config(metadata, path)

    def alpha(component: str, module: str, rank: int) -> float:
        get = lambda name, default=None: config.get(f"{component}.{name}", default)  # noqa: E731
        value = get("lora_alpha", rank)
        for (literal, anchored), pattern_alpha in (get("alpha_pattern") or {}).items():
            if module == literal or (not anchored and module.endswith("." + literal)):  # peft's rule, without regex
                value = pattern_alpha
                break
        # rsLoRA scales by alpha / sqrt(r); alpha * sqrt(r) gives the same factor as alpha / r.
        return float(value) * (rank ** 0.5 if get("use_rslora") else 1.0)

    return alpha


# An alpha_pattern / rank_pattern key as diffusers and minidream write it: a module path, re.escape'd or not,
# optionally anchored with ^ and $. peft runs such keys as regular expressions; a file's keys are never run here
# (a crafted pattern can take hours): they are read as the literal module paths they spell, and any other is refused.
_LITERAL_PATTERN = re.compile(r"(?P<anchored>\^)?(?P<path>(?:\w|\\?\.)+)\$?", re.ASCII)


def _lora_config(metadata: dict[str, str], path) -> dict:
    """diffusers' LoraConfig metadata ({"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}), checked: a JSON
    object whose alphas are finite numbers; each pattern dict is returned as {(module path, anchored): value}."""
    def fail(problem: str):
        return LoRAFileError(f"{path}: the metadata entry {DIFFUSERS_METADATA_KEY} {problem}; the file is damaged "
                             "or crafted: use an intact copy of the LoRA")

    try:
        config = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    except (ValueError, RecursionError) as e:
        raise fail(f"is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise fail(f"is a JSON {type(config).__name__}, not an object {{...}}")
    for key, value in config.items():
        name = key.rpartition(".")[2]
        if name == "lora_alpha" and not _is_number(value):
            raise fail(f"sets {key}={str(value)[:40]}, not a finite number")
        if name in ("alpha_pattern", "rank_pattern") and value is not None:
            if not isinstance(value, dict) or not all(map(_is_number, value.values())):
                raise fail(f"sets {key} to {str(value)[:60]}, not an object of module patterns -> numbers")
            matches = {pattern: _LITERAL_PATTERN.fullmatch(pattern) for pattern in value}
            if not all(matches.values()):
                bad = next(p for p, m in matches.items() if m is None)
                raise fail(f"has the {name} key {bad[:60]!r}, not a module path (a regular expression is not run)")
            config[key] = {(m["path"].replace("\\.", "."), bool(m["anchored"])): value[p] for p, m in matches.items()}
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_KOHYA_PATTERN = re.compile(r"(?P<prefix>lora_unet|lora_te1|lora_te2|lora_te)_(?P<module>[^.]+)\."
                            r"(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)")
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}


def _parse_kohya(tensors) -> dict[str, dict[str, LoRAWeights]]:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        m = _KOHYA_PATTERN.fullmatch(key)
        if m is None:
            raise LoRAFileError(f"LoRA key {key!r} is not a kohya key (<prefix>_<module>.lora_down.weight / "
                             ".lora_up.weight / .alpha / .dora_scale)")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
                "dora_scale": "magnitude"}[m["part"]]
        parts[_KOHYA_COMPONENT[m["prefix"]], m["module"]][part] = tensor
    return parts


def _assemble(parts, default_alpha, path, kohya: bool) -> dict[str, dict[str, LoRAWeights]]:
    """{component: {module: LoRAWeights}} from each module's down, up and alpha tensors, each
    checked; DoRAWeights with a magnitude (a kohya dora_scale (1, in[, 1, 1]): input channels)."""
    adapters: dict[str, dict[str, LoRAWeights]] = defaultdict(dict)
    for (component, module), p in parts.items():
        missing = [name for name in ("down", "up") if name not in p]
        if missing:
            raise LoRAFileError(f"{path}: LoRA module {component}.{module} has no {' and no '.join(missing)} "
                                "weight; the file is incomplete")
        problem = check_lora_tensors(p)
        if problem:
            raise LoRAFileError(f"{path}: LoRA module {component}.{module} {problem}; the file is damaged: "
                                "re-download or re-train it")
        rank = p["down"].shape[0]
        alpha = float(p["alpha"].item()) if "alpha" in p else default_alpha(component, module, rank)
        if "magnitude" in p:  # DoRA
            m = p["magnitude"]
            on_output = not kohya or m.shape[0] != 1 or m.numel() == 1
            adapters[component][module] = DoRAWeights(p["down"], p["up"], alpha, m.flatten(), on_output)
        else:
            adapters[component][module] = LoRAWeights(p["down"], p["up"], alpha)
    return dict(adapters)


def check_lora_tensors(p: dict[str, torch.Tensor]) -> str:
    """What is wrong with one module's down (r, in[, k, k]), up (out, r[, 1, 1]) and optional alpha, or ""."""
    down, up = p["down"], p["up"]
    if not (2 <= down.dim() <= 4 and 2 <= up.dim() <= 4):
        return f"has down {tuple(down.shape)} / up {tuple(up.shape)}, not matrices"
    if down.shape[0] == 0 or down.shape[0] != up.shape[1]:
        return f"has a rank mismatch: down {tuple(down.shape)} / up {tuple(up.shape)} (need (r, in) / (out, r), r > 0)"
    if "alpha" in p and p["alpha"].numel() != 1:
        return f"has an alpha of shape {tuple(p['alpha'].shape)}, not one number"
    for name, tensor in p.items():
        if not (tensor.is_floating_point() or name == "alpha") or tensor.is_complex():
            return f"has a {tensor.dtype} {name}, not floating point"
        if not torch.isfinite(tensor).all():  # NaN or inf: applied, they make black images
            return f"has NaN or infinite values in its {name}"
    return ""


# ----------------------------------------------------------------------------------------------
# Matching file names to model modules


def _flat(name: str) -> str:
    """The spelling-independent form: dots -> underscores, no leading text_model (transformers 5's
    CLIPTextModel dropped it from module names; files keep it)."""
    return name.replace(".", "_").removeprefix("text_model_")


def _module_index(model: nn.Module, sgm: bool) -> dict[str, str]:
    index = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            key = _flat(unet_module_to_sgm(path, model) if sgm else path)
            if key in index:
                raise RuntimeError(f"module names {index[key]} and {path} collide as {key}")
            index[key] = path
    return index


def load_lora(path, *, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
              text_encoder_2: nn.Module | None = None, name: str | None = None,
              scale: float = 1.0) -> str:
    """Add the LoRA in `path` to the given models as adapter `name` (default: the file's stem,
    made an identifier) with strength `scale`; returns the adapter name.

    Every key of the file must match a module (and every shape that module): a LoRA for another
    base model or a misspelled key is an error, and then no model is changed.
    """
    lora = read_lora(path)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    name = name or re.sub(r"\W", "_", Path(path).stem).lstrip("0123456789") or "lora"
    resolved = {}
    for component, weights in lora.adapters.items():
        model = models[component]
        if model is None:
            raise LoRAFileError(f"{path} has {len(weights)} {component} LoRA module(s) but no {component} "
                             f"was given; pass {component}=... to load_lora")
        index = _module_index(model, sgm=component == "unet" and lora.layout == "kohya_sgm")
        unmatched = [k for k in weights if _flat(k) not in index]
        if unmatched:
            raise mismatch_error(unmatched, f"the {component} ({type(model).__name__})", f"File: {path}.")
        resolved[component] = {index[_flat(k)]: w for k, w in weights.items()}
    for component, weights in resolved.items():  # check every component before changing any
        try:
            check_adapter_weights(models[component], name, weights)
        except LoRAFileError as e:
            raise type(e)(f"{path}: {e}") from None
    for component, weights in resolved.items():
        load_adapter_weights(models[component], name, weights, scale)
    return name


# ----------------------------------------------------------------------------------------------
# Writing


def lora_to_tensors(adapters: dict[str, dict[str, LoRAWeights]], layout: str = "diffusers",
                    unet: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """{component: {model module path: LoRAWeights}} -> (file tensors, layout metadata)."""
    unknown = [c for c in adapters if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown LoRA component {unknown[0]!r}; expected one of {COMPONENTS}")
    if layout == "diffusers":
        return diffusers_tensors(adapters)
    if layout not in ("kohya", "kohya_sgm"):
        raise ValueError(f"cannot write LoRA layout {layout!r}; use 'diffusers', 'kohya' or 'kohya_sgm'")
    tensors = {}
    for component, weights in adapters.items():
        for path, w in weights.items():
            name = file_module_name(component, path)
            if component == "unet" and layout == "kohya_sgm":
                name = unet_module_to_sgm(path, unet)
            stem = KOHYA_PREFIX[component] + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = w.down
            tensors[f"{stem}.lora_up.weight"] = w.up
            tensors[f"{stem}.alpha"] = torch.tensor(float(w.alpha))
    return tensors, {}


def save_lora(path, *, layout: str = "diffusers", **models_and_metadata) -> Path:
    """Write a model's adapter to `path` in `layout` (see minidream.lora_file.save_lora for the rest)."""
    unet = models_and_metadata.get("unet")
    return save_diffusers_layout(path, **models_and_metadata,
                                 to_tensors=lambda adapters: lora_to_tensors(adapters, layout, unet))


def add_loras(model, loras, fuse: bool = True) -> list[str]:
    """Apply LoRA files to the model: `loras` is [(path, scale), ...]; returns the adapter names.

    Each file may hold UNet and text-encoder adapters (diffusers or kohya layout); every key must
    fit, or nothing of that file is loaded. fuse=True folds all of them into the base weights
    (W += scale * B A * alpha / r, lora_stack.merge_lora), so sampling runs plain matmuls at the
    base model's speed; lora_stack.unmerge_lora undoes it. A quantised UNet (int8/nf4 base weights)
    keeps its adapters unmerged whatever `fuse` says. DoRA files fuse too, in the order given
    (W <- f (W + s B A), lora_stack); `scale` multiplies s, as peft's adapter weights do.
    """
    text = model.text
    names = []
    for i, (path, scale) in enumerate(loras):
        names.append(load_lora(path, unet=model.unet, text_encoder=text.text_encoder,
                               text_encoder_2=text.text_encoder_2, name=f"lora{i}", scale=scale))
    if fuse:
        unet = None if quantised_layers(model.unet) else model.unet
        for module in (unet, text.text_encoder, text.text_encoder_2):
            if module is not None:
                merge_lora(module)
    return names
