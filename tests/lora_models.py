"""Tiny random models shared by tests/test_lora.py and tests/test_lora_files.py.

The LoRA code only relies on module *names* (to_q, to_k, to_v, to_out.0, ff.net.0.proj, ...), which
minidream's UNet shares with diffusers' UNet2DConditionModel. The reference is diffusers' UNet (+ peft);
the model under test is minidream's UNet carrying the same weights.
"""

import torch
from torch import nn
from diffusers import UNet2DConditionModel
from minidream.toy.tiny import TEXT_WIDTHS, UNET, configs
from minidream.formats.lora_stack import require_adapter, stack_layers
from minidream.formats.lora_weights import load_adapter_weights
from minidream.lora import find_targets
from minidream.lora_file import LoRAWeights
from minidream.unet import UNet, UNetConfig
from tests._model_factory import rel_err  # noqa: F401 (re-exported for the LoRA tests)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# The bundled tiny SDXL's architecture (minidream.toy.tiny): 3 levels, the first without attention,
# depth-2 transformers at the deepest, linear proj_in/out, text_time added conditioning.
TINY_SDXL_UNET = UNET
POOLED = TEXT_WIDTHS[1]  # pooled text width (text_encoder_2's projection)


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
                ctx=torch.randn(2, 5, UNET["cross_attention_dim"], generator=g),
                pooled=torch.randn(2, POOLED, generator=g), time_ids=torch.randn(2, 6, generator=g))


def run_reference(unet: UNet2DConditionModel, inp: dict) -> torch.Tensor:
    added = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    return unet(inp["x"], inp["t"], inp["ctx"], added_cond_kwargs=added).sample


def run_under_test(unet: torch.nn.Module, inp: dict) -> torch.Tensor:
    """minidream's UNet forward signature."""
    return unet(inp["x"], inp["t"], inp["ctx"], inp["pooled"], inp["time_ids"])


def text_encoders(seed: int = 0):
    """The tiny model's two text encoders (CLIP-L and OpenCLIP bigG stand-ins), randomly initialised."""
    torch.manual_seed(seed)
    tiny = configs()
    return (CLIPTextModel(CLIPTextConfig.from_dict(tiny["text_encoder"])).eval(),
            CLIPTextModelWithProjection(CLIPTextConfig.from_dict(tiny["text_encoder_2"])).eval())


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



def write_random_lora(path, unet, text_encoder=None, text_encoder_2=None, seed: int = 3):
    """A LoRA file for these models (attention of the UNet and of the given text encoders; rank 4,
    alpha 8) with random weights. The models get the adapter "default": pass throwaway copies."""
    from minidream.lora import inject_lora
    from minidream.formats.lora_files import save_lora

    inject_lora(unet, "attn", rank=4, alpha=8)
    for i, encoder in enumerate((text_encoder, text_encoder_2)):
        if encoder is not None:
            inject_lora(encoder, "text", rank=4, alpha=8)
            randomize_lora(encoder, seed=seed + 1 + i)
    randomize_lora(unet, seed=seed)
    return save_lora(path, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)


# Several named adapters (minidream.formats.lora_stack), as the tests compare them with peft's multi-adapter API.

def stack_random_adapter(model: nn.Module, targets, name: str, rank: int, alpha: float,
                         scale: float = 1.0, seed: int = 0) -> None:
    """Add adapter `name` with random A and B to every module matched by `targets` (through
    load_adapter_weights, the way LoRA files are applied)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for path in find_targets(model, targets):
        w = model.get_submodule(path).weight
        ones = [1] * (w.dim() - 2)  # Conv2d: B is (out, r, 1, 1)
        weights[path] = LoRAWeights(torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
                                    torch.randn(w.shape[0], rank, *ones, generator=g) * 0.1, alpha)
    load_adapter_weights(model, name, weights, scale)


def set_adapter_scale(model: nn.Module, name: str, scale: float) -> None:
    """Set the user strength of adapter `name` everywhere (e.g. 0.8 for a style LoRA)."""
    require_adapter(model, name)
    for _, layer in stack_layers(model):
        if name in layer.lora_A:
            layer.check_unmerged("change a scale")
            layer.scale[name] = float(scale)


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Only `names` contribute to the forward (and to merge()); the others stay loaded but idle."""
    for name in names:
        require_adapter(model, name)
    for _, layer in stack_layers(model):
        layer.check_unmerged("change the active adapters")
        layer.active = [n for n in names if n in layer.lora_A]


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
