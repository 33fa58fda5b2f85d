"""Test helpers for the checkpoint loader: original (SGM / LDM / OpenCLIP) tensor names, and tiny
SDXL-shaped models written in the on-disk layouts real checkpoints have.

The original key sets are generated here from the *architecture* of the original code (Stability's
sgm `UNetModel`, CompVis' ldm `Encoder`/`Decoder`, OpenCLIP's text tower): which modules each block
holds and their shapes. They are written without looking at minidream's rename tables, and the
tests check them against diffusers' own single-file converter (which must turn them into exactly
a diffusers model's state dict) before comparing minidream's renames with diffusers' renames.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidream.toy.tiny import transformers4_names as hf_v4_names
from tests._model_factory import SDXL_CONFIGS, sdxl_config  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

SDXL_DIR = SDXL_CONFIGS
UNET, VAE = "model.diffusion_model.", "first_stage_model."  # single-file prefixes of each part
CLIP_L, OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


# Public diffusers configs of SD 1.5 and SD 2.1 UNets (the architecture fields).
SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, sample_size=96)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Original key sets from the original architectures
# ---------------------------------------------------------------------------------------------


def _norm(name, ch):
    return {f"{name}.weight": (ch,), f"{name}.bias": (ch,)}


def _conv(name, cout, cin, k):
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _linear(name, cout, cin, bias=True):
    return {f"{name}.weight": (cout, cin), **({f"{name}.bias": (cout,)} if bias else {})}


def _sgm_resblock(p, cin, cout, emb):
    """sgm ResBlock: in_layers [GroupNorm, SiLU, conv], emb_layers [SiLU, Linear],
    out_layers [GroupNorm, SiLU, Dropout, conv], 1x1 skip_connection when widths differ."""
    out = {**_norm(f"{p}.in_layers.0", cin), **_conv(f"{p}.in_layers.2", cout, cin, 3)}
    out.update(_linear(f"{p}.emb_layers.1", cout, emb))
    out.update({**_norm(f"{p}.out_layers.0", cout), **_conv(f"{p}.out_layers.3", cout, cout, 3)})
    if cin != cout:
        out.update(_conv(f"{p}.skip_connection", cout, cin, 1))
    return out


def _sgm_transformer(p, ch, depth, context, linear):
    """sgm SpatialTransformer: GroupNorm, proj_in, `depth` BasicTransformerBlocks, proj_out."""
    proj = (lambda n: _linear(n, ch, ch)) if linear else (lambda n: _conv(n, ch, ch, 1))
    out = {**_norm(f"{p}.norm", ch), **proj(f"{p}.proj_in"), **proj(f"{p}.proj_out")}
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", ch), ("attn2", context)):
            out.update(_linear(f"{b}.{attn}.to_q", ch, ch, bias=False))
            out.update(_linear(f"{b}.{attn}.to_k", ch, kv, bias=False))
            out.update(_linear(f"{b}.{attn}.to_v", ch, kv, bias=False))
            out.update(_linear(f"{b}.{attn}.to_out.0", ch, ch))
        out.update(_linear(f"{b}.ff.net.0.proj", 8 * ch, ch))  # GEGLU: two halves of 4 * ch
        out.update(_linear(f"{b}.ff.net.2", ch, 4 * ch))
        for n in ("norm1", "norm2", "norm3"):
            out.update(_norm(f"{b}.{n}", ch))
    return out


def sgm_unet_shapes(cfg: dict) -> dict[str, tuple]:
    """Names and shapes of sgm's UNetModel (no prefix) for a diffusers UNet config."""
    chans, lpb = cfg["block_out_channels"], cfg["layers_per_block"]
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, list) else [depth] * len(chans)
    attention = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    linear, context = cfg.get("use_linear_projection", False), cfg["cross_attention_dim"]
    c0, emb = chans[0], 4 * chans[0]
    out = {**_linear("time_embed.0", emb, c0), **_linear("time_embed.2", emb, emb)}
    if cfg.get("addition_embed_type") == "text_time":
        adm = cfg["projection_class_embeddings_input_dim"]
        out.update({**_linear("label_emb.0.0", emb, adm), **_linear("label_emb.0.2", emb, emb)})
    out.update(_conv("input_blocks.0.0", c0, cfg["in_channels"] if "in_channels" in cfg else 4, 3))
    skip_chans, ch, n = [c0], c0, 1
    for level, width in enumerate(chans):
        for _ in range(lpb):
            out.update(_sgm_resblock(f"input_blocks.{n}.0", ch, width, emb))
            ch = width
            if attention[level]:
                out.update(_sgm_transformer(f"input_blocks.{n}.1", ch, depth[level], context, linear))
            skip_chans.append(ch)
            n += 1
        if level != len(chans) - 1:
            out.update(_conv(f"input_blocks.{n}.0.op", ch, ch, 3))
            skip_chans.append(ch)
            n += 1
    out.update(_sgm_resblock("middle_block.0", ch, ch, emb))
    out.update(_sgm_transformer("middle_block.1", ch, depth[-1], context, linear))
    out.update(_sgm_resblock("middle_block.2", ch, ch, emb))
    n = 0
    for level in reversed(range(len(chans))):
        for i in range(lpb + 1):
            out.update(_sgm_resblock(f"output_blocks.{n}.0", ch + skip_chans.pop(), chans[level], emb))
            ch, sub = chans[level], 1
            if attention[level]:
                out.update(_sgm_transformer(f"output_blocks.{n}.1", ch, depth[level], context, linear))
                sub = 2
            if level and i == lpb:
                out.update(_conv(f"output_blocks.{n}.{sub}.conv", ch, ch, 3))
            n += 1
    out.update({**_norm("out.0", c0), **_conv("out.2", cfg.get("out_channels", 4), c0, 3)})
    return out


def _ldm_resnet(p, cin, cout):
    out = {**_norm(f"{p}.norm1", cin), **_conv(f"{p}.conv1", cout, cin, 3)}
    out.update({**_norm(f"{p}.norm2", cout), **_conv(f"{p}.conv2", cout, cout, 3)})
    if cin != cout:
        out.update(_conv(f"{p}.nin_shortcut", cout, cin, 1))
    return out


def _ldm_mid(p, ch, conv_attention):
    attn = {**_norm(f"{p}.attn_1.norm", ch)}
    for n in ("q", "k", "v", "proj_out"):
        attn.update(_conv(f"{p}.attn_1.{n}", ch, ch, 1) if conv_attention else _linear(f"{p}.attn_1.{n}", ch, ch))
    return {**_ldm_resnet(f"{p}.block_1", ch, ch), **attn, **_ldm_resnet(f"{p}.block_2", ch, ch)}


def ldm_vae_shapes(cfg: dict, conv_attention: bool = True) -> dict[str, tuple]:
    """Names and shapes of ldm's AutoencoderKL (Encoder, Decoder, quant convs), no prefix."""
    chans, lpb, z = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    out = _conv("encoder.conv_in", chans[0], cfg.get("in_channels", 3), 3)
    ch = chans[0]
    for i, width in enumerate(chans):
        for j in range(lpb):
            out.update(_ldm_resnet(f"encoder.down.{i}.block.{j}", ch, width))
            ch = width
        if i != len(chans) - 1:
            out.update(_conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3))
    out.update(_ldm_mid("encoder.mid", ch, conv_attention))
    out.update({**_norm("encoder.norm_out", ch), **_conv("encoder.conv_out", 2 * z, ch, 3)})
    out.update({**_conv("quant_conv", 2 * z, 2 * z, 1), **_conv("post_quant_conv", z, z, 1)})
    ch = chans[-1]
    out.update(_conv("decoder.conv_in", ch, z, 3))
    out.update(_ldm_mid("decoder.mid", ch, conv_attention))
    for i in reversed(range(len(chans))):  # ldm keeps decoder levels indexed by resolution
        for j in range(lpb + 1):
            out.update(_ldm_resnet(f"decoder.up.{i}.block.{j}", ch, chans[i]))
            ch = chans[i]
        if i != 0:
            out.update(_conv(f"decoder.up.{i}.upsample.conv", ch, ch, 3))
    out.update({**_norm("decoder.norm_out", ch), **_conv("decoder.conv_out", cfg.get("out_channels", 3), ch, 3)})
    return out


def openclip_shapes(width, layers, vocab, context, projection, mlp=None) -> dict[str, tuple]:
    """OpenCLIP text tower: token/positional embeddings, resblocks with fused attention in_proj,
    ln_final, text_projection (width, projection), logit_scale."""
    mlp = mlp or 4 * width
    out = {"token_embedding.weight": (vocab, width), "positional_embedding": (context, width)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        out.update({f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,)})
        out.update(_linear(f"{b}.attn.out_proj", width, width))
        out.update({**_norm(f"{b}.ln_1", width), **_norm(f"{b}.ln_2", width)})
        out.update({**_linear(f"{b}.mlp.c_fc", mlp, width), **_linear(f"{b}.mlp.c_proj", width, mlp)})
    out.update({**_norm("ln_final", width), "text_projection": (width, projection), "logit_scale": ()})
    return out


def openclip_from_hf(hf: dict) -> dict[str, torch.Tensor]:
    """Write HF CLIPTextModelWithProjection weights the way OpenCLIP stores them (the inverse of
    the documented OpenCLIP -> HF correspondence: fused q/k/v, transposed projection)."""
    hf = {k.removeprefix("text_model."): v for k, v in hf.items()}
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    layers = {int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        h, o = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        for leaf in ("weight", "bias"):
            qkv = [hf[f"{h}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{o}.attn.in_proj_{leaf}"] = torch.cat(qkv)
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
                out[f"{o}.{theirs}.{leaf}"] = hf[f"{h}.{ours}.{leaf}"]
    return out


def meta_tensors(shapes: dict[str, tuple], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Tiny models in real layouts (the diffusers folder itself comes from minidream.toy.tiny)
# ---------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and distinct (default inits leave zeros and ones that hide swaps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def reference_models(folder: Path) -> dict:
    """The parts of a diffusers folder as diffusers and transformers themselves load them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval(),
    }


def original_names(converter, shapes, prefix, *args) -> dict[str, str]:
    """{diffusers name: original name}: diffusers' converter run on meta tensors, read backwards."""
    originals = meta_tensors(shapes, prefix)
    by_id = {id(t): k for k, t in originals.items()}
    converted = converter(originals, *args)
    return {k: by_id[id(t._base if t._base is not None else t)] for k, t in converted.items()}


def single_file_state(models: dict) -> dict[str, torch.Tensor]:
    """The models' weights as an SGM single file (sd_xl_base_1.0.safetensors) holds them.

    UNet and VAE names come from diffusers' own single-file converters run backwards (never from
    minidream's renames); the VAE attention is stored as 1x1 convs like the original files; CLIP-L
    keeps transformers 4 names (+ position_ids), bigG is written the OpenCLIP way.
    """
    from diffusers.loaders import single_file_utils as sfu

    unet, vae, te1, te2 = (models[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
    single = {}
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    config = dict(unet.config)
    names = original_names(sfu.convert_ldm_unet_checkpoint, sgm_unet_shapes(config), UNET, config)
    assert set(names) == set(unet_sd)
    single.update({names[k]: v for k, v in unet_sd.items()})
    config = dict(vae.config)
    vae_shapes = ldm_vae_shapes(config)  # attention as 1x1 convs, like the original files
    names = original_names(sfu.convert_ldm_vae_checkpoint, vae_shapes, VAE, config)
    assert set(names) == set(vae_sd)
    single.update({names[k]: v.reshape(vae_shapes[names[k][len(VAE) :]]) for k, v in vae_sd.items()})
    single.update({CLIP_L + k: v for k, v in hf_v4_names(te1.state_dict()).items()})
    single[CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    single.update({OPENCLIP + k: v for k, v in openclip_from_hf(te2.state_dict()).items()})
    return {k: v.contiguous() for k, v in single.items()}


def write_single_file(models: dict, path: Path) -> dict[str, torch.Tensor]:
    """Save single_file_state(models) to `path`; returns the tensors written."""
    single = single_file_state(models)
    save_file(single, str(path))
    return single


def write_clip_folder(folder: Path, model) -> None:
    """A text_encoder*/ folder as transformers 5 saves it: CLIPTextModel keys without the
    `text_model.` level, no position_ids (real repos, written by transformers 4, have both)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config))
    state = {k.removeprefix("text_model."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
