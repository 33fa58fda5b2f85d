"""UNetConfig: every width, depth and head count of a Stable Diffusion UNet (SD 1.x, 2.x, SDXL)."""

from dataclasses import dataclass

from minidream.diffusers_config import read_diffusers_config

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_level(value, n, name):
    """An int (same for every level) or a list/tuple of n values -> tuple of n values."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"UNetConfig.{name}={value!r}: give a positive int or one per level ({n})")
    return values


@dataclass
class UNetConfig:
    """UNet hyperparameters, named as in diffusers' unet/config.json. Defaults: SDXL base 1.0.

    diffusers' `attention_head_dim` is, for every SD family, the NUMBER of heads per level (a
    misnomer kept for compatibility): SD 1.x 8 everywhere, SD 2.x (5, 10, 20, 20), SDXL (5, 10, 20);
    head size = channels // heads. `num_attention_heads`, when set, overrides it, same meaning."""

    sample_size: int | None = 128  # latent side trained at (1024 px / 8); informational
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted-noise channels out
    block_out_channels: tuple = (320, 640, 1280)  # feature channels per resolution level
    down_block_types: tuple = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2  # attention or not
    up_block_types: tuple = ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",)  # deepest level first
    layers_per_block: int | tuple = 2  # resnets per down level (up: one more); int or per level
    transformer_layers_per_block: int | tuple = (1, 2, 10)  # blocks per spatial transformer
    attention_head_dim: int | tuple = (5, 10, 20)  # NUMBER of heads per level (diffusers' misnomer)
    num_attention_heads: int | tuple | None = None  # correctly named head count; overrides it
    cross_attention_dim: int = 2048  # text-token width (CLIP-L 768 + OpenCLIP bigG 1280)
    use_linear_projection: bool = True  # proj_in/out Linear (SD 2.x, SDXL) or 1x1 conv (SD 1.x)
    upcast_attention: bool | None = None  # SD 2.1 fp16 softmax fix; no effect: SDPA sums in fp32
    addition_embed_type: str | None = "text_time"  # SDXL pooled-text + size/crop ids; or None
    addition_time_embed_dim: int | None = 256  # sinusoid width for each of the 6 time ids
    projection_class_embeddings_input_dim: int | None = 2816  # pooled + 6 * addition_time_embed_dim
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
        n, kinds = len(self.block_out_channels), [*DOWN_TYPES, *UP_TYPES]
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError("UNetConfig: block_out_channels, down/up_block_types need one entry "
                             "per level")
        unknown = [k for k in self.down_block_types if k not in DOWN_TYPES]
        unknown += [k for k in self.up_block_types if k not in UP_TYPES]
        if unknown:
            raise ValueError(f"UNetConfig: block types {unknown} not implemented (use {kinds})")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError("UNetConfig.cross_attention_dim must be one int (no per-level widths)")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r} not "
                             "implemented: use None (SD 1.x/2.x) or 'text_time' (SDXL)")
        text_time_dims = self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        if self.addition_embed_type == "text_time" and not text_time_dims:
            raise ValueError("UNetConfig: 'text_time' embeddings need addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")
        for ch, heads in zip(self.block_out_channels, self.per_level()[2]):
            if ch % heads:
                raise ValueError(f"UNetConfig: {heads} attention heads do not divide {ch} channels")

    def per_level(self):
        """(resnets per down level, blocks per spatial transformer, heads): ints per level each."""
        n, heads = len(self.block_out_channels), self.num_attention_heads
        heads = self.attention_head_dim if heads is None else heads
        return (_per_level(self.layers_per_block, n, "layers_per_block"),
                _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block"),
                _per_level(heads, n, "attention_head_dim"))

    @classmethod
    def from_dict(cls, d):
        """Read a diffusers unet/config.json dict; ValueError for features minidream lacks."""
        return read_diffusers_config(cls, d, "UNet")
