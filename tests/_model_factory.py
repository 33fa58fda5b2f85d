"""Tiny random UNet / VAE configs in diffusers' config.json form, and helpers to build them.

Shared by the model tests (and usable by the loader tests): each tiny config keeps the structure
of a real family (levels with and without attention, per-level transformer depth, conv or linear
projections, SDXL's added text_time embedding) at widths small enough for a CPU test.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SDXL_CONFIGS = ROOT / "configs" / "sdxl-base-1.0"

# SDXL-shaped: 3 levels, the first without attention, transformer depth 2 at the deepest level,
# linear proj_in/out, text_time embedding (pooled 16 + 6 time ids x 8 = 64).
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    block_out_channels=[32, 64, 64], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4],
    cross_attention_dim=24, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
    norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)
TINY_SDXL_POOLED_DIM = 16

# SD 1.x-shaped: 4 levels, the last without attention, 1x1-conv proj_in/out, one head count (int)
# for all levels (diffusers' attention_head_dim=8 in SD 1.5), no added embedding.
TINY_SD1_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    block_out_channels=[16, 32, 32, 48], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=20, use_linear_projection=False,
    norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)

# SD 2.x-shaped: like SD 1.x but linear projections, a per-level head count giving head size 8 at
# every level (SD 2: attention_head_dim=[5, 10, 20, 20], head size 64), upcast_attention (SD 2.1).
TINY_SD2_UNET = dict(
    TINY_SD1_UNET, attention_head_dim=[2, 4, 4, 6], use_linear_projection=True, upcast_attention=True,
    cross_attention_dim=28,
)

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=[16, 32, 32], norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    sample_size=32, scaling_factor=0.13025, force_upcast=True,
)


def rel_err(a, b):
    """Relative error used by the parity tests: max|a - b| / max|b| (b = the reference)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb_(model, seed, scale=0.05):
    """Add small noise to every parameter, so norm weights are not all 1 and biases not all 0
    (a swapped or ignored norm/bias then changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def save_diffusers(model_cls, config, folder, seed):
    """Build a random diffusers model from a config dict and save_pretrained it into `folder`."""
    torch.manual_seed(seed)
    ref = perturb_(model_cls(**config), seed).eval()
    ref.save_pretrained(folder)
    return ref


def load_minidream(model_cls, config_cls, folder):
    """Build the minidream model from folder/config.json and load folder's safetensors, strictly."""
    config = config_cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))
    model = model_cls(config)
    model.load_state_dict(load_file(Path(folder) / "diffusion_pytorch_model.safetensors"), strict=True)
    return model.eval()


def sdxl_config(name):
    """The real SDXL base 1.0 config.json of component `name` ("unet", "vae") as a dict."""
    return json.loads((SDXL_CONFIGS / name / "config.json").read_text())
