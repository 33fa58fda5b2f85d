"""The tiny SDXL-architecture model the training tests run on, in the diffusers folder layout.

minidream.tiny.write_tiny_sdxl (the bundled model's builder) when it is there; until then a
stand-in with the same signature and on-disk layout (model_index.json, scheduler/, unet/, vae/,
tokenizer*/, text_encoder*/): minidream's own UNet and VAE (whose state-dict keys are diffusers')
with random weights, and the tiny CLIP parts of tests/_text_factory.py. 32 px images.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    from minidream.tiny import write_tiny_sdxl  # noqa: F401
except ImportError:
    from _text_factory import write_tiny_sdxl_text_parts

    from minidream.unet import UNet, UNetConfig
    from minidream.vae import VAE, VAEConfig

    ROOT = Path(__file__).resolve().parent.parent
    TEXT_HIDDEN = (64, 64)  # CLIP-L and bigG stand-ins (64-wide heads, as the real ones)
    UNET = dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
        block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 1],
        attention_head_dim=[2, 4], cross_attention_dim=sum(TEXT_HIDDEN), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_HIDDEN[1] + 6 * 8, norm_num_groups=8,
        flip_sin_to_cos=True, freq_shift=0,
    )
    VAE_CONFIG = dict(
        _class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=[16, 32, 32], norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    )

    def _write_part(folder: Path, config: dict, model, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # away from the init: norm weights not all 1, biases not all 0
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))

    def write_tiny_sdxl(folder, seed: int = 0) -> Path:
        folder = Path(folder)
        write_tiny_sdxl_text_parts(folder, seed, hidden=TEXT_HIDDEN, layers=(2, 2))
        torch.manual_seed(seed)
        _write_part(folder / "unet", UNET, UNet(UNetConfig.from_dict(UNET)), seed)
        _write_part(folder / "vae", VAE_CONFIG, VAE(VAEConfig.from_dict(VAE_CONFIG)), seed + 1)
        (folder / "scheduler").mkdir(exist_ok=True)
        shutil.copy(ROOT / "configs/sdxl-base-1.0/scheduler/scheduler_config.json", folder / "scheduler")
        parts = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"]}
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True, **parts}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return folder
