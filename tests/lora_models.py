"""Tiny random models shared by tests/test_lora.py and tests/test_lora_files.py.

The LoRA code only relies on module *names* (to_q, to_k, to_v, to_out.0, ff.net.0.proj, ...), which
minidream's UNet shares with diffusers' UNet2DConditionModel. The reference is diffusers' UNet (+ peft);
the model under test is minidream's UNet carrying the same weights.
"""

import torch
from diffusers import UNet2DConditionModel
from minidream.unet import UNet, UNetConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# A shrunken SDXL UNet: DownBlock2D then a cross-attention block with 2 transformer layers,
# linear proj_in/out, text_time added conditioning (6 time ids x 8 + pooled 32 = 80).
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=8,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 vocab_size=99, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def reference_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SDXL_UNET).eval()


def unet_under_test(reference: torch.nn.Module) -> torch.nn.Module:
    """The UNet minidream's LoRA is tested on, holding `reference`'s weights.

    minidream's own UNet, built from the reference's config.
    """
    model = UNet(UNetConfig.from_dict(dict(reference.config)))
    model.load_state_dict(reference.state_dict())
    return model.eval()


def unet_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([10, 700]),
                ctx=torch.randn(2, 5, 64, generator=g), pooled=torch.randn(2, 32, generator=g),
                time_ids=torch.randn(2, 6, generator=g))


def run_reference(unet: UNet2DConditionModel, inp: dict) -> torch.Tensor:
    added = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    return unet(inp["x"], inp["t"], inp["ctx"], added_cond_kwargs=added).sample


def run_under_test(unet: torch.nn.Module, inp: dict) -> torch.Tensor:
    """minidream's UNet forward signature."""
    return unet(inp["x"], inp["t"], inp["ctx"], inp["pooled"], inp["time_ids"])


def text_encoders(seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(**TINY_CLIP)
    return CLIPTextModel(config).eval(), CLIPTextModelWithProjection(config).eval()


def token_ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: torch.nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """Give every LoRA matrix (minidream's or peft's) random values: B starts at zero, which
    would make every comparison trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
