"""Single-file renames on the full-size key sets, against diffusers' own single-file converter.

For each part, the original key set (built from the original architecture in checkpoint_fixtures)
is first checked against diffusers: its converter must turn it into exactly the state dict of the
diffusers / transformers model built from the real config. Then minidream's renames must send every
original tensor to the same name (and shape) as diffusers' converter does. Meta tensors: no memory.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from checkpoint_fixtures import (  # noqa: E402
    SD15_UNET, SD21_UNET, hf_v4_names, ldm_vae_shapes, meta_tensors, openclip_shapes, sdxl_config,
    sgm_unet_shapes,
)  # fmt: skip
from minidream.formats import sgm_keys, single_file  # noqa: E402
from minidream.formats.single_file import shaped_after  # noqa: E402

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


def meta_state(cls, config):
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def origin(t):
    """The original tensor a converter's output came from (views keep their base)."""
    return t._base if t._base is not None else t


def diffusers_pairs(converted: dict, originals: dict) -> dict[str, str]:
    """{original name: diffusers name} by tensor identity."""
    by_id = {id(t): k for k, t in originals.items()}
    return {by_id[id(origin(t))]: k for k, t in converted.items()}


@pytest.mark.parametrize("name,config", [("sdxl", sdxl_config("unet")), ("sd15", SD15_UNET), ("sd21", SD21_UNET)])
def test_unet_renames_match_diffusers_on_full_key_set(name, config):
    shapes = sgm_unet_shapes(config)
    originals = meta_tensors(shapes, UNET_PREFIX)
    converted = sfu.convert_ldm_unet_checkpoint(originals, config)
    # 1. the generated original key set is what diffusers' converter expects, key for key
    expected = meta_state(UNet2DConditionModel, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(converted) == len(originals)  # every original tensor used exactly once
    if name == "sdxl":
        assert len(expected) == 1680
    # 2. minidream sends each original tensor where diffusers does
    theirs = diffusers_pairs(converted, originals)
    ours = {UNET_PREFIX + k: sgm_keys.unet_name(k, config["layers_per_block"]) for k in shapes}
    assert ours == theirs
    # 3. and the inverse rename (used for kohya LoRA names) gives the original name back
    filled = full_config(config)
    for k in shapes:
        assert sgm_keys.sgm_unet_name(sgm_keys.unet_name(k, config["layers_per_block"]), filled) == k


def full_config(config):
    """The config with the defaults diffusers fills in (up_block_types etc.)."""
    with torch.device("meta"):
        return dict(UNet2DConditionModel.from_config(config).config)


@pytest.mark.parametrize("name,config", [("sdxl", sdxl_config("unet")), ("sd15", SD15_UNET), ("sd21", SD21_UNET)])
def test_unet_config_read_off_shapes(name, config):
    family = {"sdxl": "sdxl", "sd15": "sd1", "sd21": "sd2"}[name]
    shapes = sgm_unet_shapes(config)
    context = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    assert single_file.family_from_context(context, "label_emb.0.0.weight" in shapes) == family
    inferred = single_file.unet_config(shapes, family, pooled_dim=1280 if family == "sdxl" else None)
    reference = full_config(config)
    built = full_config({k: v for k, v in inferred.items() if not k.startswith("_")})
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "up_block_types", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "sample_size", "in_channels", "out_channels"):  # fmt: skip
        assert list_or_value(built[key]) == list_or_value(reference[key]), key
    heads = reference["attention_head_dim"]
    heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(reference["block_out_channels"])
    assert list(built["attention_head_dim"]) == list(heads)
    assert meta_state(UNet2DConditionModel, built) == meta_state(UNet2DConditionModel, config)


def list_or_value(v):
    return list(v) if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("conv_attention", [True, False])
def test_vae_renames_match_diffusers_on_full_key_set(conv_attention):
    config = sdxl_config("vae")
    shapes = ldm_vae_shapes(config, conv_attention)
    originals = meta_tensors(shapes, VAE_PREFIX)
    converted = sfu.convert_ldm_vae_checkpoint(originals, config)
    expected = meta_state(AutoencoderKL, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(converted) == len(originals)
    theirs = diffusers_pairs(converted, originals)
    levels = len(config["block_out_channels"])
    ours = {}
    for k, s in shapes.items():
        ((target, op),) = sgm_keys.vae_name(k, levels, len(s))
        ours[VAE_PREFIX + k] = target
        assert shaped_after(s, op) == expected[target], k
    assert ours == theirs


def test_vae_config_read_off_shapes():
    config = sdxl_config("vae")
    inferred = single_file.vae_config(ldm_vae_shapes(config), "sdxl")
    for key, value in inferred.items():
        if not key.startswith("_"):
            assert config[key] == value, key


def test_clip_l_renames_match_diffusers():
    config = CLIPTextConfig.from_dict(sdxl_config("text_encoder"))
    model_names = meta_state(CLIPTextModel, config)  # transformers 5: no text_model. level
    # Real SDXL single files: transformers 4 names + the position_ids buffer, under embedders.0
    prefix = "conditioner.embedders.0.transformer."
    shapes = hf_v4_names(model_names) | {"text_model.embeddings.position_ids": (1, 77)}
    originals = meta_tensors(shapes, prefix)
    theirs = diffusers_pairs(sfu.convert_ldm_clip_checkpoint(originals), originals)
    for k in shapes:
        if not single_file.ignored(prefix + k):
            assert [(theirs[prefix + k], "")] == sgm_keys.clip_name(k)
    parts = single_file.split_parts({k: tuple(v.shape) for k, v in originals.items()})
    inferred = single_file.clip_config(hf_v4_names(model_names), "quick_gelu")
    assert set(parts["text_encoder"][1]) == set(hf_v4_names(model_names))  # position_ids skipped
    for key, value in inferred.items():
        assert sdxl_config("text_encoder")[key] == value, key


def _openclip_ours(shapes):
    ours = {}
    for k, s in shapes.items():
        for target, op in sgm_keys.openclip_name(k):
            ours[target] = shaped_after(s, op)
    return ours


def test_openclip_bigg_renames_match_diffusers_and_transformers():
    reference = sdxl_config("text_encoder_2")
    config = CLIPTextConfig.from_dict(reference)
    shapes = openclip_shapes(1280, 32, 49408, 77, 1280)
    prefix = "conditioner.embedders.1.model."
    originals = meta_tensors(shapes, prefix)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    theirs = sfu.convert_open_clip_checkpoint(model, originals, prefix=prefix)
    theirs = {k: tuple(v.shape) for k, v in theirs.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert theirs == expected  # the generated OpenCLIP key set is the real one
    kept = {k: s for k, s in shapes.items() if not single_file.ignored(prefix + k)}
    assert set(shapes) - set(kept) == {"logit_scale"}
    assert _openclip_ours(kept) == expected
    inferred = single_file.clip_config(expected, "gelu")
    for key, value in inferred.items():
        assert reference[key] == value, key


def test_openclip_sd2_text_encoder_drops_the_last_block_like_diffusers():
    """SD 2.x: OpenCLIP ViT-H (24 blocks) -> diffusers' 23-block CLIPTextModel, no projection."""
    prefix = "cond_stage_model.model."
    shapes = openclip_shapes(1024, 24, 49408, 77, 1024)
    originals = meta_tensors(shapes, prefix)
    config = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, projection_dim=512, hidden_act="gelu")  # fmt: skip
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)  # diffusers' converter wants .config only
    theirs = sfu.convert_open_clip_checkpoint(model, originals, prefix=prefix)
    theirs = {k: tuple(v.shape) for k, v in theirs.items()}
    from minidream.formats.single_file import SingleFile

    sf = SingleFile("meta.safetensors", header={prefix + k: s for k, s in shapes.items()} | unet_stub())
    assert sf.family == "sd2"
    inferred, weights = sf.text_encoder("text_encoder")
    assert {k: tuple(w.shape) for k, w in weights.items()} == theirs
    assert inferred["num_hidden_layers"] == 23 and inferred["architectures"] == ["CLIPTextModel"]
    assert set(hf_v4_names(meta_state(CLIPTextModel, CLIPTextConfig.from_dict(inferred)))) == set(theirs)


def unet_stub():
    return {UNET_PREFIX + k: s for k, s in sgm_unet_shapes(SD21_UNET).items()}


def test_unet_names_outside_the_architecture_are_not_renamed():
    for bad in ("input_blocks.1.0.foo.weight", "middle_block.5.in_layers.0.weight", "output_blocks.x.0.weight", "label_emb.1.weight"):
        assert sgm_keys.unet_name(bad, 2) is None, bad
    assert sgm_keys.vae_name("encoder.mid.attn_2.q.weight", 4) == []
    assert sgm_keys.openclip_name("transformer.resblocks.0.attn.bias_k") == []


@pytest.mark.parametrize("family,unet,text", [
    ("sdxl", sdxl_config("unet"), ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]),
    ("sdxl-refiner", sdxl_config("unet"), ["conditioner.embedders.0.model."]),
    ("sd2", SD21_UNET, ["cond_stage_model.model."]),
    ("sd1", SD15_UNET, ["cond_stage_model.transformer."]),
])  # fmt: skip
def test_family_from_the_text_encoders_a_file_carries(family, unet, text):
    header = {UNET_PREFIX + k: s for k, s in sgm_unet_shapes(unet).items()}
    for prefix in text:
        header[prefix + "token_embedding.weight"] = (49408, 1024)
    assert single_file.SingleFile("x.safetensors", header).family == family


def test_full_size_sdxl_single_file_fits_the_models_built_from_its_inferred_configs():
    """The whole single-file path at full size, headers only: split by prefix, skip the known
    extras, infer every config, rename, and pass the strict name + shape check of each model."""
    from minidream.formats.checkpoint import fit_text_names
    from minidream.formats.loading import check_weights

    te1 = CLIPTextConfig.from_dict(sdxl_config("text_encoder"))
    header = {UNET_PREFIX + k: s for k, s in sgm_unet_shapes(sdxl_config("unet")).items()}
    header |= {VAE_PREFIX + k: s for k, s in ldm_vae_shapes(sdxl_config("vae")).items()}
    clip_l = hf_v4_names(meta_state(CLIPTextModel, te1)) | {"text_model.embeddings.position_ids": (1, 77)}
    header |= {"conditioner.embedders.0.transformer." + k: s for k, s in clip_l.items()}
    header |= {"conditioner.embedders.1.model." + k: s for k, s in openclip_shapes(1280, 32, 49408, 77, 1280).items()}
    sf = single_file.SingleFile("sd_xl_base_1.0.safetensors", header)
    assert sf.family == "sdxl"
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        config, weights = getattr(sf, part)()
        with torch.device("meta"):
            model = cls.from_config(config)
        check_weights(model, weights, part)
        assert dict(model.config)["sample_size"] == sdxl_config(part)["sample_size"]
    for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        config, weights = sf.text_encoder(part)
        with torch.device("meta"):
            model = cls(CLIPTextConfig.from_dict(config))
        check_weights(model, fit_text_names(weights, model), part)
