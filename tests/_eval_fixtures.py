"""Tiny random stand-ins for the evaluation models, written in the layout their hub repos have.

- CLIP ViT-B/32 (openai/clip-vit-base-patch32): config.json + weights from save_pretrained, the BPE
  tokenizer as vocab.json + merges.txt, and preprocessor_config.json with the legacy
  feature-extractor keys the hub repo ships (size/crop_size as plain ints, resample 3 = bicubic).
- DINO ViT-S/16 (facebook/dino-vits16): a ViTModel without pooler, preprocessor_config.json as
  its repo ships it (resize to a square, resample 2 = bilinear, ImageNet mean/std).
At 32 px instead of 224 px, so a test embeds images in milliseconds. Nothing is downloaded.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from minidream.formats.lora_files import save_lora
from minidream.lora import UNET_ATTENTION, inject_lora, lora_parameters
from minidream.formats.models import BUNDLED_MODEL, REPO, load_model
from minidream.toy.vocab import vocab_size, write_clip_tokenizer

WORDS = tuple("a an the of on in at with photo dog cat person backpack rraj sks red purple shiny wet cube shaped "
              "jungle snow beach city mountain wearing hat".split())
SIZE = 32  # input side of both tiny models (real: 224)

CLIP_PREPROCESSOR = {  # openai/clip-vit-base-patch32's file, with 224 -> SIZE
    "crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": SIZE,
}
DINO_PREPROCESSOR = {  # facebook/dino-vits16's file, with 224 -> SIZE
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": SIZE,
}


def write_tiny_clip(folder, seed: int = 0) -> Path:
    folder = Path(folder)
    write_clip_tokenizer(folder, WORDS)
    text = dict(vocab_size=vocab_size(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
    vision = dict(image_size=SIZE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    return folder


def write_tiny_dino(folder, seed: int = 0) -> Path:
    folder = Path(folder)
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, qkv_bias=True, layer_norm_eps=1e-6)
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINO_PREPROCESSOR, indent=2))
    return folder


def random_image(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random colour image (blocks, so that resizing keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


# ----------------------------------------------------------------------------- a tiny SDXL to sample from

TINY_SDXL = REPO / BUNDLED_MODEL


def write_lora(path: Path, model_folder: Path, seed: int, token="rraj", class_noun="dog") -> Path:
    """A random rank-2 LoRA on the UNet's attention (B non-zero, so it changes the images)."""
    unet = load_model(model_folder).unet
    inject_lora(unet, UNET_ATTENTION, rank=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return save_lora(path, unet=unet, token=token, class_noun=class_noun, base_model=str(model_folder))


def write_subject(folder: Path, n: int = 3, token="rraj", class_noun="dog") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        random_image(100 + i, (40, 48)).save(folder / f"{i:02d}.png")
    (folder / "subject.json").write_text(json.dumps({"token": token, "class_noun": class_noun}))
    return folder
