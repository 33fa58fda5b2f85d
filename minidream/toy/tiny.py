"""The tiny SDXL bundled with minidream (weights/tiny-sdxl): its configs and the writer of its folder.

It has SDXL's architecture at toy widths, so every code path of the real model runs on any CPU in
seconds: a 3-level UNet whose first level has no attention, deeper transformers at the deepest
level, linear proj_in/out, the text_time added conditioning (pooled text + 6 size/crop ids); a
VAE with one level fewer than SDXL's (f = 4: 64 x 64 images <-> 16 x 16 latents; at f = 8 its
8 x 8 latents lose the eye and glasses colours of the toy world's faces); two CLIP text encoders
(CLIP ViT-L and OpenCLIP bigG stand-ins, 64-wide heads like theirs) whose penultimate states
concatenate to the context; two BPE tokenizers learned from WORDS, tokenizer_2 padding with "!".

It is written exactly as a real SDXL diffusers folder is laid out (stabilityai/stable-diffusion-xl-
base-1.0, text encoders saved by transformers 4: `text_model.*` names and the position_ids buffer;
tokenizers as vocab.json + merges.txt), so loading it exercises what loading the real one does, and
diffusers' own StableDiffusionXLPipeline.from_pretrained reads it too.

The bundled weights are trained on the toy world by `python -m minidream.toy.pretrain` (pretrain.py),
which starts from this file's random weights and writes its result with
`write_tiny_sdxl(folder, state_dicts=...)`. Weights are stored in fp16 (under 20 MB).

    python -m minidream.toy.tiny FOLDER        # the untrained model: random weights, same seed -> same bytes
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from minidream.formats.checkpoint import build_text_encoder, build_unet, build_vae
from minidream.files import write_json
from minidream.formats.model_folder import (LIBRARY_CLASSES, WEIGHT_FILES, transformers4_names, write_model_index,
                                            write_part)
from minidream.toy.vocab import vocab_size, write_clip_tokenizer

# Every word here is one token of both tokenizers (others still tokenize, in pieces). Extend freely.
WORDS = tuple("""
    a an the of on in at with and or by for to from is
    photo photograph picture painting drawing portrait pixel art style sketch cartoon oil watercolor realistic
    person man woman dog cat cup car backpack rraj sks
    beach snow forest city night mountain sky sunset plain background side view close up
    hair eyes skin glasses sunglasses wearing hat shirt smiling standing sitting
    red orange yellow green blue purple pink tan grey brown black white blonde round tall pointy
    van gogh oktoberfest high quality detailed blurry low ugly bad
""".split())

TEXT_WIDTHS = (64, 128)  # hidden sizes of text_encoder (CLIP-L 768) and text_encoder_2 (bigG 1280)
TEXT_LAYERS = (2, 2)  # transformer layers of each (CLIP-L 12, bigG 32)
TIME_ID_WIDTH = 16  # sinusoid width per size/crop id (SDXL: 256)
IMAGE_SIZE = 64  # pixels; latents are IMAGE_SIZE / 4 (the VAE halves twice, SDXL's thrice)

# diffusers unet/config.json (written with its "_class_name"). SDXL: (320, 640, 1280) channels, (1, 2, 10) transformer depths,
# (5, 10, 20) heads of 64. Channels are multiples of 32 (GroupNorm's 32 groups) and heads are
# 64 wide, the rules a single-file checkpoint's config is inferred by.
UNET = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [1, 1, 2],  # diffusers' name for the NUMBER of heads
    "cross_attention_dim": sum(TEXT_WIDTHS),  # both encoders' tokens, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_ID_WIDTH,
    "projection_class_embeddings_input_dim": TEXT_WIDTHS[1] + 6 * TIME_ID_WIDTH,  # pooled + 6 ids
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# diffusers vae/config.json. SDXL: (128, 256, 512, 512) channels.
VAE = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "act_fn": "silu",
    "scaling_factor": 0.13025,
    "force_upcast": True,  # as SDXL's: fp16 runs decode in fp32 (vae.vae_dtype)
}

# SDXL base 1.0's scheduler/scheduler_config.json, unchanged: the tiny model is trained on it.
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the parts with weights


def clip_text_config(hidden: int, layers: int, hidden_act: str, vocab: int, projection: bool,
                     dtype: torch.dtype = torch.float32) -> dict:
    """config.json of a CLIP text encoder with the keys real SDXL text encoders have."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2,  # as in SDXL's configs: transformers then pools at the highest id, EOS
        "hidden_act": hidden_act, "hidden_size": hidden, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": 4 * hidden, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": hidden // 64, "num_hidden_layers": layers,
        "pad_token_id": 1, "projection_dim": hidden, "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": vocab,
    }  # fmt: skip


def configs(words=WORDS, dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """{part: config dict} of the tiny model; the text encoders' vocabulary is learned from `words`."""
    vocab = vocab_size(words)
    return {
        "unet": UNET,
        "vae": VAE,
        "text_encoder": clip_text_config(TEXT_WIDTHS[0], TEXT_LAYERS[0], "quick_gelu", vocab, False, dtype),
        "text_encoder_2": clip_text_config(TEXT_WIDTHS[1], TEXT_LAYERS[1], "gelu", vocab, True, dtype),
    }


def stored_shapes(part: str, config: dict) -> dict[str, tuple]:
    """{tensor name: shape} of `part` as its file stores it (text: transformers 4 names + position_ids)."""
    build = {"unet": build_unet, "vae": build_vae}.get(part, build_text_encoder)
    with torch.device("meta"):
        model = build(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if part.startswith("text_encoder"):
        shapes = transformers4_names(shapes)
        shapes["text_model.embeddings.position_ids"] = (1, config["max_position_embeddings"])
    return shapes


def random_weights(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights for `shapes`, a function of the names, shapes and seed only.

    Matrices and kernels ~ N(0, 1 / fan_in) (keeps activations at unit scale), embedding tables
    ~ N(0, 0.02^2) as CLIP initialises them, norm scales ~ 1 and biases ~ 0 (both with a little
    noise, so no two tensors are equal and a swapped pair shows). position_ids = 0, 1, ..., 76.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):  # sorted: the bytes do not depend on module order in the code
        shape = shapes[name]
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1]).expand(shape).contiguous()
            continue
        noise = torch.randn(shape, generator=g)
        if name.endswith("embedding.weight"):  # token_embedding, position_embedding
            out[name] = 0.02 * noise
        elif len(shape) >= 2:
            out[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".weight"):  # 1-D weights are LayerNorm / GroupNorm scales
            out[name] = 1 + 0.02 * noise
        else:
            out[name] = 0.02 * noise
    return out


def _checked(part: str, state: dict, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A given (trained) state dict in stored names, after checking it fits the tiny config."""
    if part.startswith("text_encoder"):
        state = transformers4_names(state)
        state.setdefault("text_model.embeddings.position_ids", torch.arange(shapes["text_model.embeddings.position_ids"][-1])[None])
    problems = [f"missing {k}" for k in shapes if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in shapes]
    problems += [f"{k}: {tuple(v.shape)} vs {shapes[k]}" for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if problems:
        raise ValueError(f"the {part} state dict does not fit the tiny config ({len(problems)} problems: "
                         f"{'; '.join(problems[:5])}); train a model built from minidream.toy.tiny.configs()")
    return {k: v.detach().cpu() for k, v in state.items()}


def write_tiny_sdxl(folder, seed: int = 0, *, state_dicts: dict | None = None, words=WORDS,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write the tiny SDXL as a diffusers folder; returns the folder.

    seed: random weights for every part not in `state_dicts` (part i uses seed * 100 + i).
    state_dicts: optional trained weights {part: state dict} for any of PARTS, in minidream /
        transformers names (text encoders in either transformers 4 or 5 naming); checked strictly.
    dtype: of the stored weights; float16 for the bundled model, float32 for exact test fixtures.
    """
    folder = Path(folder)
    state_dicts = dict(state_dicts or {})
    unknown = set(state_dicts) - set(PARTS)
    if unknown:
        raise ValueError(f"state_dicts has unknown parts {sorted(unknown)}; use {', '.join(PARTS)}")
    for i, (part, config) in enumerate(configs(words, dtype).items()):
        shapes = stored_shapes(part, config)
        given = state_dicts.get(part)
        state = random_weights(shapes, seed * 100 + i) if given is None else _checked(part, given, shapes)
        if part in ("unet", "vae"):  # diffusers configs name their class; transformers' use "architectures"
            config = {"_class_name": LIBRARY_CLASSES[part][1], **config}
        write_part(folder / part, config, state, WEIGHT_FILES[part], dtype)
    write_clip_tokenizer(folder / "tokenizer", words)
    write_clip_tokenizer(folder / "tokenizer_2", words, pad_token="!")
    write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER)
    write_model_index(folder)
    return folder


def parameter_counts(words=WORDS) -> dict[str, int]:
    """{part: number of parameters} (position_ids is a buffer, not counted)."""
    return {part: sum(math.prod(s) for k, s in stored_shapes(part, c).items() if not k.endswith("position_ids"))
            for part, c in configs(words).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minidream.toy.tiny",
        description="Write the tiny SDXL-architecture model with random fp16 weights (the same seed gives "
                    "byte-identical files). The bundled, trained weights/tiny-sdxl comes from python -m minidream.toy.pretrain.")
    parser.add_argument("folder", help="where to write it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    args = parser.parse_args(argv)
    folder = write_tiny_sdxl(args.folder, args.seed)
    counts = parameter_counts()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder}: {size / 1e6:.2f} MB, "
          + ", ".join(f"{p} {n / 1e6:.2f}M" for p, n in counts.items()) + " parameters (fp16)")


if __name__ == "__main__":
    main()
