"""Single-file checkpoints (`sd_xl_base_1.0.safetensors` style): tensor names -> minidream's names.

A single file stores the whole pipeline under the names of the original training code
(Stability's `sgm` for SDXL, CompVis' `ldm` for SD 1.x / 2.x); single_file.py splits it by prefix:

    model.diffusion_model.*                   UNet      (input_blocks / middle_block / output_blocks)
    first_stage_model.*                       VAE       (encoder.down / decoder.up / mid.attn_1)
    conditioner.embedders.0.transformer.*     CLIP ViT-L text encoder, already in HF names (SDXL)
    conditioner.embedders.1.model.*           OpenCLIP ViT-bigG text encoder (SDXL)
    cond_stage_model.transformer.*            CLIP ViT-L (SD 1.x)
    cond_stage_model.model.*                  OpenCLIP ViT-H (SD 2.x)

The functions here rename one tensor (name without its prefix) to the name minidream's modules use:
diffusers' UNet2DConditionModel / AutoencoderKL names, transformers' CLIP names. The VAE and text
renames return a list of (new name, op) pairs, op saying how the tensor must be reshaped (see
loading.TensorRef); an empty list (or None for the UNet) means "not a name I know".
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# UNet: model.diffusion_model.*
# ---------------------------------------------------------------------------------------------
#
# The SGM UNet is three flat lists. input_blocks[0] is conv_in; then each resolution level has
# `layers_per_block` blocks [ResBlock, SpatialTransformer?] and, except the last level, one
# [Downsample]. middle_block is [ResBlock, SpatialTransformer, ResBlock]. output_blocks has
# `layers_per_block + 1` blocks per level, [ResBlock, SpatialTransformer?, Upsample?], the Upsample
# on the last block of every level but the last. diffusers groups the same modules per level.

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's pooled-text + size/crop embedding
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_RESNET = {  # SGM ResBlock keeps its layers in nn.Sequentials; diffusers names them
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# The SpatialTransformer (norm, proj_in, transformer_blocks.N.attn1/attn2/ff/norm1-3, proj_out)
# has the same inner names on both sides.


def _replace_prefix(name: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def _resnet(name: str) -> str | None:
    return _replace_prefix(name, _RESNET)


def unet_name(sgm: str, layers_per_block: int) -> str | None:
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight` (no prefix).

    Works for tensor names and module names alike; None for a name that is not part of a UNet.
    """
    top = _replace_prefix(sgm, _UNET_TOP)
    if top is not None:
        return top
    parts = sgm.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    group, index, sub, rest = parts[0], int(parts[1]), parts[2], ".".join(parts[3:])
    per_level = layers_per_block + 1
    if group == "input_blocks" and index > 0:
        level, j = divmod(index - 1, per_level)
        if j == layers_per_block:  # the level's last entry is its Downsample (a strided conv "op")
            op = _replace_prefix(f"{sub}.{rest}", {"0.op": "downsamplers.0.conv"})
            return op and f"down_blocks.{level}.{op}"
        return _res_or_attn(f"down_blocks.{level}", j, sub, rest)
    if group == "middle_block":
        inner = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}.get(str(index))
        if inner is None:
            return None
        if inner.startswith("resnets"):
            mapped = _resnet(".".join(parts[2:]))
            return mapped and f"mid_block.{inner}.{mapped}"
        return f"mid_block.{inner}." + ".".join(parts[2:])
    if group == "output_blocks":
        level, j = divmod(index, per_level)
        if sub != "0" and (rest == "conv" or rest.startswith("conv.")):  # Upsample: 1, or 2 after attention
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return _res_or_attn(f"up_blocks.{level}", j, sub, rest)
    return None


def _res_or_attn(block: str, j: int, sub: str, rest: str) -> str | None:
    if sub == "0":
        mapped = _resnet(rest)
        return mapped and f"{block}.resnets.{j}.{mapped}"
    if sub == "1" and rest:
        return f"{block}.attentions.{j}.{rest}"
    return None


def sgm_unet_name(name: str, config: dict) -> str:
    """The inverse of `unet_name`: diffusers UNet name -> SGM name (for kohya LoRA files)."""
    per_level = config["layers_per_block"] + 1
    for sgm, ours in _UNET_TOP.items():
        if name == ours or name.startswith(ours + "."):
            return sgm + name[len(ours) :]
    parts = name.split(".")
    if parts[0] == "mid_block":
        kind, i, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * i}." + _replace_prefix(rest, {v: k for k, v in _RESNET.items()})
    block, level, kind = parts[0], int(parts[1]), parts[2]
    if kind in ("downsamplers", "upsamplers"):  # downsamplers.0.conv.weight / upsamplers.0.conv...
        tail = ".".join(parts[4:])
        if block == "down_blocks":
            return f"input_blocks.{1 + level * per_level + per_level - 1}.0.op" + tail[len("conv") :]
        has_attention = config["up_block_types"][level].startswith("CrossAttn")
        return f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.{tail}"
    j, rest = int(parts[3]), ".".join(parts[4:])
    index = 1 + level * per_level + j if block == "down_blocks" else level * per_level + j
    group = "input_blocks" if block == "down_blocks" else "output_blocks"
    if kind == "attentions":
        return f"{group}.{index}.1.{rest}"
    return f"{group}.{index}.0." + _replace_prefix(rest, {v: k for k, v in _RESNET.items()})


# ---------------------------------------------------------------------------------------------
# VAE: first_stage_model.*
# ---------------------------------------------------------------------------------------------
#
# The LDM decoder numbers its levels by resolution (up.0 is the full-resolution level, the last to
# run); diffusers numbers them in the order they run (up_blocks.0 is the lowest resolution).
# The mid-block attention is written with 1x1 convs in the original files (weights (C, C, 1, 1))
# and with linear layers in some re-saved ones ((C, C)); minidream uses linear layers.

_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_name(ldm: str, num_levels: int, ndim: int = 2) -> list[tuple[str, str]]:
    """`decoder.up.3.block.0.conv1.weight` -> [(`decoder.up_blocks.0.resnets.0.conv1.weight`, "")]."""
    parts = ldm.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return [(ldm, "")]
    if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
        return []
    side, what, rest = parts[0], parts[1], parts[2:]
    if what in ("conv_in", "conv_out"):
        return [(ldm, "")]
    if what == "norm_out":
        return [(f"{side}.conv_norm_out." + ".".join(rest), "")]
    if what == "mid" and rest[0] in ("block_1", "block_2"):
        i = int(rest[0][-1]) - 1
        return [(f"{side}.mid_block.resnets.{i}." + _vae_resnet(rest[1:]), "")]
    if what == "mid" and rest[0] == "attn_1" and rest[1] in _VAE_ATTENTION:
        op = "squeeze" if ndim > 2 else ""  # 1x1 conv kernel -> linear weight
        return [(f"{side}.mid_block.attentions.0.{_VAE_ATTENTION[rest[1]]}." + ".".join(rest[2:]), op)]
    if what in ("down", "up") and len(rest) >= 3:
        level = int(rest[0]) if what == "down" else num_levels - 1 - int(rest[0])
        blocks = f"{side}.{what}_blocks.{level}"
        if rest[1] == "block":
            return [(f"{blocks}.resnets.{rest[2]}." + _vae_resnet(rest[3:]), "")]
        if rest[1] in ("downsample", "upsample"):
            return [(f"{blocks}.{rest[1]}rs.0." + ".".join(rest[2:]), "")]
    return []


def _vae_resnet(rest: list[str]) -> str:
    name = ".".join(rest)
    return "conv_shortcut" + name[len("nin_shortcut") :] if name.startswith("nin_shortcut") else name


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------
#
# Names are produced in the layout of real SDXL repositories (written by transformers 4): both
# encoders' tensors start with `text_model.`. transformers 5's CLIPTextModel drops that prefix;
# checkpoint.py adapts to whichever layout the model being filled uses.


def clip_name(hf: str) -> list[tuple[str, str]]:
    """CLIP ViT-L in a single file already uses HF names; older files lack the `text_model.` level."""
    return [(hf if hf.startswith("text_model.") else "text_model." + hf, "")]


_OPENCLIP_TOP = {
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", ""),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", ""),
    "ln_final.weight": ("text_model.final_layer_norm.weight", ""),
    "ln_final.bias": ("text_model.final_layer_norm.bias", ""),
    # OpenCLIP multiplies x @ P with P (width, embed); nn.Linear stores P transposed
    "text_projection": ("text_projection.weight", "transpose"),
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_name(name: str) -> list[tuple[str, str]]:
    """OpenCLIP text tower -> transformers CLIPTextModelWithProjection names.

    nn.MultiheadAttention keeps q, k, v as one (3 * width, width) `in_proj_weight`; CLIP has three
    Linear layers, so one OpenCLIP tensor becomes three (ops "q", "k", "v": thirds along dim 0).
    """
    if name in _OPENCLIP_TOP:
        return [_OPENCLIP_TOP[name]]
    parts = name.split(".")
    if parts[:2] != ["transformer", "resblocks"] or len(parts) < 5:
        return []
    layer, rest = f"text_model.encoder.layers.{parts[2]}", ".".join(parts[3:])
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = rest.rsplit("_", 1)[1]  # weight / bias
        return [(f"{layer}.self_attn.{p}_proj.{leaf}", p) for p in "qkv"]
    mapped = _replace_prefix(rest, _OPENCLIP_BLOCK)
    return [(f"{layer}.{mapped}", "")] if mapped else []


def openclip_layer(name: str) -> int | None:
    """Which transformer block an OpenCLIP tensor belongs to (None outside the blocks)."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["transformer", "resblocks"] and parts[2].isdigit() else None

