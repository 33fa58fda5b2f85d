"""diffusers' unet/ and vae/ config.json dicts -> minidream's config dataclasses, never half-read.

Per model: the keys of features minidream lacks, with the values that mean "off"; diffusers' class
defaults, which files that omit a key rely on (old SD 1.x ones); keys with no effect here."""

import dataclasses

_UNET_FEATURE_OFF = {
    "act_fn": ("silu",), "attention_type": ("default",), "center_input_sample": (False,),
    "class_embed_type": (None,), "class_embeddings_concat": (False,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "cross_attention_norm": (None,), "dropout": (0.0,),
    "dual_cross_attention": (False,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "mid_block_only_cross_attention": (None, False), "mid_block_scale_factor": (1.0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "num_class_embeds": (None,),
    "only_cross_attention": (False,), "resnet_out_scale_factor": (1.0,),
    "resnet_skip_time_act": (False,), "resnet_time_scale_shift": ("default",),
    "reverse_transformer_layers_per_block": (None,), "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,), "time_embedding_dim": (None,),
    "time_embedding_type": ("positional",), "timestep_post_act": (None,)}
# UNet2DConditionModel's defaults: an SD 1.x UNet.
_UNET_LIBRARY_DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), layers_per_block=2,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, transformer_layers_per_block=1,
    attention_head_dim=8, num_attention_heads=None, cross_attention_dim=1280, freq_shift=0,
    use_linear_projection=False, upcast_attention=False, addition_embed_type=None, norm_eps=1e-5,
    addition_time_embed_dim=None, projection_class_embeddings_input_dim=None, norm_num_groups=32,
    flip_sin_to_cos=True, downsample_padding=1)
_UNET_IGNORED = {"addition_embed_type_num_heads"}  # only used by addition_embed_type "text"

_VAE_FEATURE_OFF = {
    "act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,),
    "use_quant_conv": (True,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,)}
# AutoencoderKL's defaults (old SD 1.x files lack scaling_factor).
_VAE_LIBRARY_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), layers_per_block=1,
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), latent_channels=4,
    norm_num_groups=32, sample_size=32, scaling_factor=0.18215, force_upcast=True)

_TABLES = {"UNet": (_UNET_LIBRARY_DEFAULTS, _UNET_FEATURE_OFF, _UNET_IGNORED),
           "VAE": (_VAE_LIBRARY_DEFAULTS, _VAE_FEATURE_OFF, set())}


def read_diffusers_config(cls, d, what):
    """Config dataclass `cls` from the config.json dict `d` of a diffusers `what` ("UNet", "VAE");
    ValueError for a feature key set to other than its "off" values, or an unknown key."""
    library_defaults, feature_off, ignored = _TABLES[what]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(library_defaults)
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in feature_off:
            if value not in feature_off[key]:
                raise ValueError(f"{what} config sets {key}={value!r}, a feature minidream does "
                                 f"not implement (supported: {feature_off[key]}); minidream "
                                 "builds the SD 1.x / 2.x / XL architectures only")
            continue
        if key not in fields:
            raise ValueError(f"{what} config has an unknown key {key!r}: is this the right file?")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
