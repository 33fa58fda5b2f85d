"""Single-file checkpoints: split one file into its parts and read the architecture off the shapes.

`sd_xl_base_1.0.safetensors` holds UNet, VAE and both text encoders under the training code's
names (see sgm_keys.py) and no config.json. This module finds which tensors belong to which part,
skips the few tensors real files carry that belong to no module, tells the model family (SDXL,
SD 1.x, SD 2.x) and produces, for each part, a diffusers/transformers-style config dict and the
TensorRefs (loading.py) that fill the part under minidream's names. Nothing is read but the header.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from minidream.formats import sgm_keys
from minidream.formats.checkpoint import (FAMILIES, ModelInfo, PartWeights, check_config, family_from_context,
                                  require)
from minidream.formats.loading import CheckpointError, TensorRef, Weights, read_header

LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "lora_unet_", "lora_te", "hada_", "lokr_")

# Which part each prefix holds. The SDXL refiner has only the OpenCLIP encoder, as embedder 0;
# SD 2.x's OpenCLIP ViT-H is diffusers' (only) `text_encoder`.
PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "conditioner.embedders.0.transformer.": "text_encoder",  # SDXL: CLIP ViT-L
    "conditioner.embedders.1.model.": "text_encoder_2",  # SDXL: OpenCLIP ViT-bigG
    "conditioner.embedders.0.model.": "text_encoder_2",  # SDXL refiner: OpenCLIP ViT-bigG
    "cond_stage_model.transformer.": "text_encoder",  # SD 1.x: CLIP ViT-L
    "cond_stage_model.model.": "text_encoder",  # SD 2.x: OpenCLIP ViT-H
}
FAMILY_OF_TEXT_PREFIX = {
    "conditioner.embedders.1.model.": "sdxl",
    "conditioner.embedders.0.model.": "sdxl-refiner",
    "cond_stage_model.model.": "sd2",
    "cond_stage_model.transformer.": "sd1",
}

# Tensors real single files carry that belong to no module: skipped. Anything else that fits no
# part is an error, so a file that is not what it seems is never half-loaded.
IGNORED_SUFFIXES = (
    "embeddings.position_ids",  # CLIP's arange(77), a saved buffer before transformers 4.31
    "model.logit_scale",  # CLIP's contrastive temperature: compares image and text, unused here
)
IGNORED_PREFIXES = (
    "model_ema.",  # an EMA copy of the UNet in some fine-tunes; the regular weights are loaded
    "denoiser.",  # SGM's precomputed sigmas (denoiser.sigmas); minidream.schedule computes them
)
IGNORED_NAMES = {  # SD 1.x / 2.x (LDM) noise-schedule buffers, recomputed by minidream.schedule
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}  # fmt: skip


def shaped_after(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    """The shape a tensor has after `op` (see loading.TensorRef), known before reading it."""
    if op == "squeeze":  # (out, in, 1, 1) conv kernel -> (out, in) linear weight; other kernels stay (and misfit)
        return tuple(shape[:2]) if all(d == 1 for d in shape[2:]) else tuple(shape)
    if op == "transpose":
        return tuple(reversed(shape))
    if op in ("q", "k", "v"):
        return (shape[0] // 3, *shape[1:])
    return tuple(shape)


def ignored(key: str) -> bool:
    return key in IGNORED_NAMES or key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES)


def split_parts(header: dict[str, tuple]) -> dict[str, tuple[str, dict[str, tuple]]]:
    """{part: (prefix, {name without prefix: shape})}; strict about tensors that fit no part."""
    parts, unplaced = {}, []
    for key, shape in header.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if ignored(key):
            continue
        if prefix is None:
            unplaced.append(key)
            continue
        parts.setdefault(PREFIXES[prefix], (prefix, {}))[1][key[len(prefix) :]] = shape
    if unplaced and "unet" in parts:
        raise CheckpointError(
            f"{len(unplaced)} tensors of this single file belong to no part minidream knows: "
            f"{', '.join(sorted(unplaced)[:8])}. A single file should hold only model.diffusion_model.*, "
            "first_stage_model.* and conditioner.embedders.* / cond_stage_model.* tensors."
        )
    return parts


def family(parts: dict) -> str:
    """SDXL / refiner / SD 2.x / SD 1.x by which text encoders come with the UNet, else by its shapes."""
    for part, (prefix, _) in parts.items():
        if prefix in FAMILY_OF_TEXT_PREFIX:
            return FAMILY_OF_TEXT_PREFIX[prefix]
    unet = parts["unet"][1]
    context = next(s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight"))
    return family_from_context(context, "label_emb.0.0.weight" in unet)


class SingleFile:
    """One single-file checkpoint: its parts, its family, and each part as (config, Weights)."""

    def __init__(self, path: Path, header: dict[str, tuple] | None = None):
        self.path = Path(path)
        self.parts = split_parts(read_header(self.path) if header is None else header)
        self.family = family(self.parts) if "unet" in self.parts else "unknown"

    def _refs(self, part: str, rename) -> Weights:
        """TensorRefs of one part; a name no rename knows is kept as is so the strict check names it."""
        prefix, shapes = self.parts[part]
        weights = {}
        for name, shape in shapes.items():
            for target, op in rename(name, shape) or [(prefix + name, "")]:
                weights[target] = TensorRef(self.path, prefix + name, shaped_after(shape, op), op)
        return weights

    def unet(self, config: dict | None = None) -> tuple[dict, Weights]:
        projection = self.parts.get("text_encoder_2", ("", {}))[1].get("text_projection")
        config = config or unet_config(self.parts["unet"][1], self.family, projection and projection[1])
        per_level = config["layers_per_block"]

        def rename(name, shape):
            new = sgm_keys.unet_name(name, per_level)
            return [(new, "")] if new else []

        return config, self._refs("unet", rename)

    def vae(self, config: dict | None = None) -> tuple[dict, Weights]:
        config = config or vae_config(self.parts["vae"][1], self.family)
        levels = len(config["block_out_channels"])
        return config, self._refs("vae", lambda name, shape: sgm_keys.vae_name(name, levels, len(shape)))

    def text_encoder(self, part: str) -> tuple[dict, Weights]:
        """(CLIPTextConfig dict, Weights in transformers 4 names: `text_model.*`)."""
        prefix, shapes = self.parts[part]
        if prefix.endswith(".transformer."):  # OpenAI CLIP ViT-L: HF names already
            weights = self._refs(part, lambda name, shape: sgm_keys.clip_name(name))
            return clip_config({k: w.shape for k, w in weights.items()}, "quick_gelu"), weights
        weights = self._refs(part, lambda name, shape: sgm_keys.openclip_name(name))
        if part == "text_encoder":  # SD 2.x uses the penultimate block: diffusers drops the last one
            last = max(i for i in map(sgm_keys.openclip_layer, shapes) if i is not None)
            unused = (f"text_model.encoder.layers.{last}.", "text_projection.")
            weights = {k: w for k, w in weights.items() if not k.startswith(unused)}
        return clip_config({k: w.shape for k, w in weights.items()}, "gelu"), weights


@contextmanager
def shapes_of(path: Path):
    """Read a file's architecture off its shapes; a file whose tensors are missing or misshapen
    (damaged, or crafted) is a CheckpointError instead of a KeyError deep inside."""
    try:
        yield
    except (KeyError, IndexError, StopIteration, ValueError, TypeError, ZeroDivisionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a complete single-file checkpoint: its tensors do not fit the "
                              f"architecture ({type(e).__name__}: {e}); re-download it") from None


# ---------------------------------------------------------------------------------------------
# The functions checkpoint.py has for folders, for a file (the package picks by path).
# Every config read off shapes passes checkpoint.check_config, as a folder's config.json does.
# ---------------------------------------------------------------------------------------------


def detect(path) -> ModelInfo:
    """What a .safetensors file holds, by its tensor names: a whole model, a LoRA, a lone VAE, ..."""
    path = Path(path)
    header = read_header(path)
    if any(marker in k for k in header for marker in LORA_MARKERS):
        text = f"a LoRA adapter ({len(header)} tensors), not a base model: apply it with --lora"
        return ModelInfo(path, "lora", text)
    with shapes_of(path):
        return _describe(path, header)


def _describe(path: Path, header: dict[str, tuple]) -> ModelInfo:
    parts = split_parts(header)
    if "unet" in parts:
        name, names = family(parts), tuple(sorted(parts))
        return ModelInfo(path, "single-file", f"{FAMILIES[name]} in one file ({', '.join(names)})", name, names)
    vae_keys = ("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
    if set(parts) == {"vae"} or any(k in header for k in vae_keys):
        return ModelInfo(path, "vae-file", "a VAE alone, not a whole model (give it with --vae)", parts=("vae",))
    if "conv_in.weight" in header and "time_embedding.linear_1.weight" in header:
        text = "a UNet alone in diffusers names (a unet/ weight file); give the folder with model_index.json"
        return ModelInfo(path, "unet-file", text, parts=("unet",))
    if any("embeddings.token_embedding" in k for k in header):
        return ModelInfo(path, "text-encoder-file", "a text encoder alone, not a whole model")
    return ModelInfo(path, "unknown", f"no tensor names minidream knows (first: {', '.join(list(header)[:3])})")


def unet_weights(path, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    """(UNet config read off the shapes, or `config`; TensorRefs in minidream's names). A file has
    no variants: `variant` is there for the folders' function of the same name."""
    info = detect(path)
    require(info, expect, "unet", ("single-file",))
    with shapes_of(info.path):
        config, weights = SingleFile(info.path).unet(config)
    return check_config(config, "unet", info.path), weights


def vae_weights(path, *, expect="sdxl", variant=None, config=None) -> PartWeights:
    """(AutoencoderKL config, TensorRefs) of a single file's VAE, or of a lone VAE file, which gets
    the scaling factor of `expect`."""
    info = detect(path)
    require(info, expect, "vae", ("single-file", "vae-file"))
    with shapes_of(info.path):
        if info.layout == "vae-file":
            config, weights = vae_file(info.path, expect or "sdxl", config)
        else:
            single = SingleFile(info.path)
            if "vae" not in single.parts:
                raise CheckpointError(f"{info.path} holds no VAE (first_stage_model.*); give one with --vae")
            config, weights = single.vae(config)
    return check_config(config, "vae", info.path), weights


def text_encoder_weights(path, part="text_encoder", *, expect="sdxl", variant=None) -> PartWeights:
    """(CLIPTextConfig dict, TensorRefs in transformers 4's `text_model.*` names) of `part`."""
    info = detect(path)
    require(info, expect, "text_encoder", ("single-file",))
    with shapes_of(info.path):
        single = SingleFile(info.path)
        if part not in single.parts:
            raise CheckpointError(f"{info.path} holds no {part} ({info.description})")
        config, weights = single.text_encoder(part)
    return check_config(config, part, info.path), weights


def vae_file(path: Path, family_name: str, config: dict | None = None) -> tuple[dict, Weights]:
    """A VAE alone in LDM names (with or without `first_stage_model.`): (config, Weights)."""
    header = read_header(path)
    shapes = {k.removeprefix("first_stage_model."): s for k, s in header.items()}
    if "encoder.down.0.block.0.conv1.weight" not in shapes:
        raise CheckpointError(f"{path} is a VAE in diffusers names without its config.json: give the folder holding both")
    config = config or vae_config(shapes, family_name)
    levels = len(config["block_out_channels"])
    weights = {}
    for key, shape in header.items():
        name = key.removeprefix("first_stage_model.")
        for target, op in sgm_keys.vae_name(name, levels, len(shape)) or [(key, "")]:
            weights[target] = TensorRef(path, key, shaped_after(shape, op), op)
    return config, weights


# ---------------------------------------------------------------------------------------------
# Architecture from tensor shapes
# ---------------------------------------------------------------------------------------------
#
# A single file has no config.json, so the config is read off the shapes. Two numbers are not
# visible in any shape: the number of attention heads (SD 1.x uses 8 heads per level, SD 2.x and
# SDXL use 64-wide heads: channels // 64) and SDXL's size-embedding width (256 per time id, unless
# the pooled text width tells otherwise). A model that breaks these rules needs its config given.

SAMPLE_SIZE = {"sdxl": 128, "sdxl-refiner": 128, "sd2": 96, "sd1": 64, "unknown": 64}  # latent px
VAE_SCALING = {"sdxl": 0.13025, "sdxl-refiner": 0.13025}  # others: SD 1.x/2.x's 0.18215
SDXL_TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}  # base: size, crop, target; refiner: + aesthetic score


def _count(shapes, prefix: str) -> int:
    """How many numbered children `prefix.N.*` exist."""
    found = {k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)}
    return len({n for n in found if n.isdigit()})


def unet_config(shapes: dict[str, tuple], family: str, pooled_dim: int | None = None) -> dict:
    """A diffusers-style UNet config dict read off SGM tensor shapes (names without prefix)."""
    c0, in_channels = shapes["input_blocks.0.0.weight"][:2]
    downsamplers = sorted(int(k.split(".")[1]) for k in shapes if k.endswith(".0.op.weight"))
    layers_per_block = downsamplers[0] - 1 if downsamplers else _count(shapes, "input_blocks.") - 1
    channels, depths, down_types = [], [], []
    for level in range(len(downsamplers) + 1):
        first = 1 + level * (layers_per_block + 1)  # first block of this level
        channels.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        depth = _count(shapes, f"input_blocks.{first}.1.transformer_blocks.")
        depths.append(max(depth, 1))  # diffusers' value for levels without attention
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
    attention = next(k for k in shapes if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in shapes if k.endswith(".proj_in.weight"))
    heads = [8] * len(channels) if family == "sd1" else [max(1, c // 64) for c in channels]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": SAMPLE_SIZE[family],
        "in_channels": in_channels,
        "out_channels": shapes["out.2.weight"][0],
        "down_block_types": down_types,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down_types)],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "transformer_layers_per_block": depths,
        "attention_head_dim": heads,
        "cross_attention_dim": shapes[attention][1],
        "use_linear_projection": len(shapes[proj_in]) == 2,  # SD 1.x projects with 1x1 convs
    }
    if shapes["time_embed.0.weight"][0] != 4 * c0:
        config["time_embedding_dim"] = shapes["time_embed.0.weight"][0]
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + sinusoid of each time id
        added = shapes["label_emb.0.0.weight"][1]
        ids = SDXL_TIME_IDS.get(family, 6)
        time_dim = (added - pooled_dim) // ids if pooled_dim and (added - pooled_dim) % ids == 0 else 256
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=added,
        )
    return config


def vae_config(shapes: dict[str, tuple], family: str) -> dict:
    """A diffusers-style AutoencoderKL config dict read off LDM VAE shapes (names without prefix)."""
    levels = _count(shapes, "encoder.down.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    # GroupNorm's group count is in no shape. SD VAEs use 32; a VAE too narrow for 32 groups (the
    # bundled tiny one starts at 16 channels) gets the largest power of two dividing every level.
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": _count(shapes, "encoder.down.0.block."),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": groups,
        "sample_size": SAMPLE_SIZE[family] * 8,
        "scaling_factor": VAE_SCALING.get(family, 0.18215),
        "force_upcast": True,  # SD VAEs overflow in fp16; run them in fp32 unless fp16-fixed
    }


def clip_config(shapes: dict[str, tuple], hidden_act: str) -> dict:
    """A transformers CLIPTextConfig dict read off HF-named CLIP text shapes (`text_model.*`).

    hidden_act is not in any shape: OpenAI's CLIP ViT-L uses "quick_gelu", OpenCLIP "gelu". The
    token ids are those of the SDXL repositories' configs (eos_token_id 2 keeps transformers'
    pooling at the argmax token, i.e. the end-of-text token of the CLIP tokenizer).
    """
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    projection = shapes.get("text_projection.weight", (hidden,))[0]
    return {
        "architectures": ["CLIPTextModelWithProjection" if "text_projection.weight" in shapes else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(shapes, "text_model.encoder.layers."),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "projection_dim": projection,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
