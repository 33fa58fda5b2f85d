"""UNetConfig: every width, depth and head count of a Stable Diffusion UNet (SD 1.x, 2.x, SDXL)."""

from dataclasses import dataclass

from minidream.layers import read_diffusers_config

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# diffusers config.json keys of features minidream does not implement, with the values that mean "off".
_UNET_FEATURE_OFF = {
    "act_fn": ("silu",), "attention_type": ("default",), "center_input_sample": (False,),
    "class_embed_type": (None,), "class_embeddings_concat": (False,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "cross_attention_norm": (None,), "dropout": (0.0,),
    "dual_cross_attention": (False,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "mid_block_only_cross_attention": (None, False), "mid_block_scale_factor": (1.0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "num_class_embeds": (None,),
    "only_cross_attention": (False,), "resnet_out_scale_factor": (1.0,), "resnet_skip_time_act": (False,),
    "resnet_time_scale_shift": ("default",), "reverse_transformer_layers_per_block": (None,),
    "time_cond_proj_dim": (None,), "time_embedding_act_fn": (None,), "time_embedding_dim": (None,),
    "time_embedding_type": ("positional",), "timestep_post_act": (None,)}
# diffusers' UNet2DConditionModel defaults (an SD 1.x UNet), used for keys a config.json omits.
_UNET_LIBRARY_DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2, transformer_layers_per_block=1, attention_head_dim=8, num_attention_heads=None,
    cross_attention_dim=1280, use_linear_projection=False, upcast_attention=False, addition_embed_type=None,
    addition_time_embed_dim=None, projection_class_embeddings_input_dim=None, norm_num_groups=32,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
# Keys with no effect on the models minidream builds.
_UNET_IGNORED = {"addition_embed_type_num_heads"}  # only used by addition_embed_type "text"


def _per_level(value, n, name):
    """An int (same for every level) or a list/tuple of n values -> tuple of n values."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"UNetConfig.{name}={value!r}: give one positive int, or a list of {n} (one per level)")
    return values


@dataclass
class UNetConfig:
    """UNet hyperparameters, named as in diffusers' unet/config.json. Defaults: SDXL base 1.0.

    diffusers' `attention_head_dim` is, for every SD family, the NUMBER of heads per level (a misnomer
    kept for compatibility): SD 1.x 8 everywhere, SD 2.x (5, 10, 20, 20), SDXL (5, 10, 20); head size =
    channels // heads. `num_attention_heads`, when set, overrides it with the same meaning."""

    sample_size: int | None = 128  # latent side the model was trained at (1024 px / 8); informational
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted-noise channels out
    block_out_channels: tuple = (320, 640, 1280)  # feature channels per resolution level
    down_block_types: tuple = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")  # attn or not
    up_block_types: tuple = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")  # deepest level first
    layers_per_block: int | tuple = 2  # resnets per down level (up levels have one more); int or per level
    transformer_layers_per_block: int | tuple = (1, 2, 10)  # TransformerBlocks per spatial transformer
    attention_head_dim: int | tuple = (5, 10, 20)  # NUMBER of heads per level (diffusers' misnomer)
    num_attention_heads: int | tuple | None = None  # correctly named head count; overrides the above
    cross_attention_dim: int = 2048  # text-token width (CLIP-L 768 + OpenCLIP bigG 1280)
    use_linear_projection: bool = True  # proj_in/out Linear (SD 2.x, SDXL) or 1x1 conv (SD 1.x)
    upcast_attention: bool | None = None  # SD 2.1 fp16 softmax fix; no effect, SDPA accumulates in fp32
    addition_embed_type: str | None = "text_time"  # SDXL pooled-text + size/crop conditioning; or None
    addition_time_embed_dim: int | None = 256  # sinusoid width for each of the 6 time ids
    projection_class_embeddings_input_dim: int | None = 2816  # pooled width + 6 * addition_time_embed_dim
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # eps of the resnet and output GroupNorms
    flip_sin_to_cos: bool = True  # sinusoid order [cos, sin]
    freq_shift: int = 0  # sinusoid frequency shift (DDPM used 1)
    downsample_padding: int = 1  # padding of the stride-2 downsampling convs
    # Fixed by the architecture (diffusers hard-codes them; not in config.json):
    transformer_norm_eps: float = 1e-6  # eps of the GroupNorm before proj_in
    layer_norm_eps: float = 1e-5  # eps of the LayerNorms in transformer blocks
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * channels
    time_embed_mult: int = 4  # time-embedding width = time_embed_mult * block_out_channels[0]

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError("UNetConfig: block_out_channels, down/up_block_types need one entry per level")
        unknown = [k for k in self.down_block_types if k not in DOWN_TYPES]
        unknown += [k for k in self.up_block_types if k not in UP_TYPES]
        if unknown:
            raise ValueError(f"UNetConfig: block types {unknown} not implemented (use {[*DOWN_TYPES, *UP_TYPES]})")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError("UNetConfig.cross_attention_dim must be one int (per-level widths are not implemented)")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r} not implemented: "
                             "use None (SD 1.x/2.x) or 'text_time' (SDXL)")
        text_time_dims = self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        if self.addition_embed_type == "text_time" and not text_time_dims:
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")
        for ch, heads in zip(self.block_out_channels, self.per_level()[2]):
            if ch % heads:
                raise ValueError(f"UNetConfig: {ch} channels do not split into {heads} attention heads")

    def per_level(self):
        """(resnets per down level, TransformerBlocks per spatial transformer, heads), one int per level each."""
        n = len(self.block_out_channels)
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return (_per_level(self.layers_per_block, n, "layers_per_block"),
                _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block"),
                _per_level(heads, n, "attention_head_dim"))

    @classmethod
    def from_dict(cls, d):
        """Read a diffusers unet/config.json dict; ValueError for features minidream lacks."""
        return read_diffusers_config(cls, d, _UNET_LIBRARY_DEFAULTS, _UNET_FEATURE_OFF, _UNET_IGNORED, "UNet")
