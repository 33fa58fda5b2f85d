"""The settings of a training run: TrainConfig, the recipes that fill unset values, checks.

Every setting left at None is chosen from the model: SDXL-sized models get the seed's T4 recipe
(issue 6: 1000 steps, lr 1e-4, rank 4, 1024 px, batch 1, fp16, gradient checkpointing, AdamW8bit,
prior preservation with 200 class images); a model whose images are at most TINY_MODEL_MAX_SIZE px
(the bundled tiny model) gets settings for a CPU demo of a minute or two.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from minidream.checkpoint import detect, unet_weights, vae_weights
from minidream.latent_cache import VIEWS_PER_INSTANCE_IMAGE
from minidream.lora import unet_targets
from minidream.optim import LR_SCHEDULES, OPTIMIZERS, PRECISIONS
from minidream.unet import UNetConfig
from minidream.vae import VAEConfig


class TrainingError(ValueError):
    """A setting or situation the user can fix; the message says how."""


# The seed's T4 recipe (issue 6) and the settings for the bundled tiny model, for every setting left
# at None. A model whose images are at most TINY_MODEL_MAX_SIZE px is "tiny": a CPU demo in minutes.
T4_RECIPE = dict(steps=1000, lr=1e-4, num_class_images=200, gradient_checkpointing=True,
                 validate_every=250, save_every=250, class_steps=30, validation_steps=30)
TINY_RECIPE = dict(steps=1500, lr=2e-3, num_class_images=40, gradient_checkpointing=False,
                   validate_every=500, save_every=500, class_steps=20, validation_steps=20, cpu_threads=1)
TINY_MODEL_MAX_SIZE = 128
# What --method changes in those recipes. Full fine-tuning moves every weight: a learning rate ~50x
# below LoRA's (DreamBooth's SD recipes use 1e-6 .. 5e-6). Textual inversion moves one vector per
# encoder: a larger lr and more steps (diffusers' example: 5e-4 for 3000 steps at batch 4).
METHOD_RECIPES = {
    "full": {"t4": dict(steps=800, lr=2e-6), "tiny": dict(lr=1e-4)},
    "textual-inversion": {"t4": dict(steps=1500, lr=5e-4), "tiny": dict(lr=5e-3)},
}
METHODS = ("lora", "full", "textual-inversion")
VALIDATION_TEMPLATES = ("a painting of {} at Oktoberfest", "a painting of {} in the style of Van Gogh",
                        "a painting of {} with blonde hair", "a side view photo of {}", "a photo of {} with sunglasses")
RESUME_OVERRIDES = ("steps", "save_every", "validate_every", "keep_checkpoints", "log_every", "device",
                    "cpu_threads")


@dataclass
class TrainConfig:
    """Every setting of a run (saved as config.json). None: chosen from the model (see T4_RECIPE)."""

    subject: str = "data/raj"  # folder with the subject's photos and subject.json
    token: str | None = None  # rare identifier, e.g. "rraj" (default: subject.json)
    class_noun: str | None = None  # e.g. "person" (default: subject.json)
    instance_prompt: str | None = None  # default "a photo of {token} {class_noun}"
    class_prompt: str | None = None  # default "a photo of {class_noun}"
    model: str | None = None  # diffusers folder or single file; None: SDXL under weights/, else the tiny model
    vae: str | None = None  # optional separate VAE (e.g. an fp16-fix VAE)
    tokenizer: str | None = None  # folder with tokenizer/ and tokenizer_2/ (for single files)
    out: str = "runs"  # run folders go here
    resume: str | None = None  # a run folder to continue from its latest checkpoint
    method: str = "lora"  # lora | full (every UNet weight) | textual-inversion (a new word's embedding)
    steps: int | None = None  # optimizer steps
    lr: float | None = None  # learning rate of the LoRA / the UNet weights / the new word's vectors
    rank: int = 4  # LoRA rank r
    alpha: float | None = None  # LoRA alpha (None: = rank, scaling 1)
    lora_targets: str = "attn"  # UNet layers with LoRA, comma-separated groups: attn, ff, proj, conv (lora.py)
    resolution: int | None = None  # training image side in px (None: the model's, SDXL 1024)
    batch_size: int = 1  # subject images per step (+ as many class images)
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp16"  # fp16 | bf16 | fp32 (fp16 falls back to fp32 without CUDA)
    device: str | None = None  # None: cuda if available, else cpu
    cpu_threads: int | None = None  # torch CPU threads (None: torch's default; the tiny model: 1)
    seed: int = 0  # seeds the LoRA init, crops, data order, noise and timesteps
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory)
    optimizer: str = "adamw8bit"  # adamw8bit (bitsandbytes) | adamw (torch)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # clip the gradient's 2-norm to this (0: no clipping)
    lr_schedule: str = "constant"  # constant | constant_with_warmup | cosine
    warmup_steps: int = 0  # linear warmup steps (not for "constant")
    snr_gamma: float | None = None  # min-SNR loss weighting gamma (Hang et al. 2023; 5.0 is usual)
    noise_offset: float = 0.0  # offset noise strength (0.05 - 0.1 is usual)
    flip: bool = True  # random horizontal flips (turn off for asymmetric subjects, e.g. text)
    center_crop: bool = False  # centre crops instead of random crops
    views_per_image: int = VIEWS_PER_INSTANCE_IMAGE  # cached augmented views per subject image
    train_text_encoder: bool = False  # LoRA on both text encoders' q/k/v/out_proj too (full: all their weights)
    text_encoder_lr: float = 5e-6  # their learning rate
    prior: bool = True  # prior preservation (class images)
    prior_weight: float = 1.0  # lambda of the prior term
    class_dir: str | None = None  # folder or .zip of class images (None: <out>/class-images/<model>/<prompt>)
    num_class_images: int | None = None  # class images to use (missing ones are generated)
    generate_class_images: bool = True  # False: error if too few class images
    class_steps: int | None = None  # sampler steps per generated class image
    guidance_scale: float = 5.0  # classifier-free guidance for class images and validation
    validate_every: int | None = None  # steps between validation grids (0: never)
    validation_prompts: list | None = None  # None: subject.json's, else the seed's five + the class prompt
    validation_seeds: list = field(default_factory=lambda: [0, 1])  # one grid column per seed
    validation_steps: int | None = None  # sampler steps of validation images
    save_every: int | None = None  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    log_every: int = 10  # steps between log lines (and loss.csv/png rewrites)
    placeholder_token: str | None = None  # textual inversion: the new word (None: "<token>", e.g. "<rraj>")
    init_word: str | None = None  # textual inversion: its vectors start as this word's (None: the class noun)
    num_vectors: int = 1  # textual inversion: vectors per encoder for the new word


# ----------------------------------------------------------------------------- settings

def model_image_size(path) -> int:
    """The model's native image side in px, from config/headers only (nothing loaded)."""
    family = detect(path).family or None
    unet = UNetConfig.from_dict(unet_weights(path, expect=family)[0])
    vae = VAEConfig.from_dict(vae_weights(path, expect=family)[0])
    return unet.sample_size * 2 ** (len(vae.block_out_channels) - 1)


def fill_defaults(cfg: TrainConfig, size: int) -> str:
    """Fill every None setting from the recipe for a model of native size `size`; returns a note."""
    tiny = size <= TINY_MODEL_MAX_SIZE
    recipe = (TINY_RECIPE if tiny else T4_RECIPE) | METHOD_RECIPES.get(cfg.method, {}).get("tiny" if tiny else "t4", {})
    chosen = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    if cfg.resolution is None:
        chosen["resolution"] = size
    for k, v in chosen.items():
        setattr(cfg, k, v)
    notes = []
    if tiny and chosen:
        notes.append(f"tiny model ({size} px): demo settings " + ", ".join(f"{k} {v}" for k, v in chosen.items())
                     + " (flags you pass override these)")
    if cfg.method == "textual-inversion" and cfg.prior:
        cfg.prior = False
        notes.append("textual inversion trains without class images: the model is frozen, and the class prompt "
                     "does not contain the new word, so the prior term would have no gradient")
    return "\n".join(notes)


def check_config(cfg: TrainConfig) -> None:
    def need(ok, message):
        if not ok:
            raise TrainingError(message)

    for name in ("steps", "rank", "resolution", "batch_size", "grad_accum", "views_per_image", "class_steps",
                 "validation_steps", "log_every"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("validate_every", "save_every", "keep_checkpoints", "warmup_steps", "noise_offset",
                 "prior_weight", "max_grad_norm", "weight_decay"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must not be negative (got {getattr(cfg, name)})")
    need(cfg.cpu_threads is None or cfg.cpu_threads >= 1, "--cpu-threads must be at least 1")
    need(cfg.lr > 0 and cfg.text_encoder_lr > 0, "learning rates must be positive")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
    need(cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
    need(cfg.snr_gamma is None or cfg.snr_gamma > 0, "--snr-gamma must be positive")
    need(cfg.resolution % 8 == 0, f"--resolution must be a multiple of 8 (got {cfg.resolution})")
    need(cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)} (got {cfg.method!r})")
    need(cfg.num_vectors >= 1, "--num-vectors must be at least 1")
    try:
        unet_targets(cfg.lora_targets)
    except ValueError as e:
        raise TrainingError(f"--lora-targets: {e}") from None
    need(not (cfg.method == "textual-inversion" and cfg.train_text_encoder),
         "--train-text-encoder does not go with --method textual-inversion, which trains only the new word's "
         "embedding: drop one of them")


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The saved config of run cfg.resume, with the few settings that may change on resume."""
    run = Path(cfg.resume)
    if not (run / "config.json").is_file():
        raise TrainingError(f"{run} is not a run folder (no config.json): give a folder under {cfg.out}/")
    names = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in json.loads((run / "config.json").read_text()).items() if k in names})
    default = TrainConfig()
    for name in names - {"resume"}:
        given = getattr(cfg, name)
        if given != getattr(default, name) and given != getattr(saved, name):
            if name in RESUME_OVERRIDES:
                setattr(saved, name, given)
            else:
                print(f"note: --{name.replace('_', '-')} ignored on resume; the run keeps {getattr(saved, name)!r}")
    saved.resume = str(run)
    return saved


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "class"
