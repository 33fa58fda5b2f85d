"""The settings of a training run: TrainConfig, the presets of the model-dependent ones, checks.

Each setting is documented once, in its field below; train.py builds its command line from these
fields. A setting left at None is model-dependent: PRESETS gives its value for each kind of model
and method, in one table. "sdxl" is the recipe for a 16 GB T4 (Colab); "tiny" a CPU demo of a few
minutes on the bundled tiny model (any model whose images are at most TINY_MAX_SIZE px).

This module is a leaf: it imports no model, loader or optimizer code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from minidream.errors import UserError

METHODS = ("lora", "full", "textual-inversion", "pivotal")
OPTIMIZERS = ("adamw8bit", "adamw")
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine")
PRECISIONS = ("fp16", "bf16", "fp32")
BASE_WEIGHTS = ("fp16", "int8", "nf4")  # the frozen UNet's Linear weights (minidream/quant)
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA run's result (the name diffusers looks for)
EMBEDDING_FILE = "learned_embeds.safetensors"  # what textual inversion writes (diffusers' name)
TINY_MAX_SIZE = 128  # px: a model whose native images are this small gets the "tiny" preset

# Every model-dependent setting, per (model kind, method). Full fine-tuning moves every weight:
# an lr ~50x below LoRA's (DreamBooth's SD recipes use 1e-6 .. 5e-6). Textual inversion moves one
# vector per encoder: a larger lr, more steps (diffusers' example: 5e-4 for 3000 steps at batch 4).
# The tiny model's LoRA also adapts feed-forward and projection layers, at a higher lr, its prior
# term weighs half, and it stops at 1200 steps: on the bundled model that kept the subject under new
# prompts far more often, at no drift (benchmarks/TOY_WORLD.md, "What was tried").
# Class images and validation grids: DPM-Solver++(2M) at 10 steps matches DDIM 30 in the toy world
# (TOY_WORLD.md section 10: fields right 94% vs 95%, DIV 0.66 both; DreamBooth on its class images
# 78/37/0 look/edits/drift vs 70/39/0). SDXL takes 15: the toy world's 64 px pictures cannot show
# fine detail, and guided DPM-Solver++ samples settle by 15-20 steps (Lu et al. 2022, sec. 6). The
# tiny demo keeps DDIM 20, one image per call (17 s of its 134 s run; 8 per call would take 9 s but
# round differently, and every measured figure of the demo was made this way: TOY_WORLD.md).
_SDXL = dict(steps=1000, lr=1e-4, num_class_images=200, gradient_checkpointing=True,
             validate_every=250, save_every=250, class_steps=15, validation_steps=15,
             sampler="dpmpp-2m", class_batch=0, cpu_threads=None, lora_targets="attn",
             prior_weight=1.0)
_TINY = dict(steps=1200, lr=3e-3, num_class_images=40, gradient_checkpointing=False,
             validate_every=500, save_every=500, class_steps=20, validation_steps=20, cpu_threads=1,
             sampler="ddim", class_batch=1, lora_targets="attn,ff,proj", prior_weight=0.5)
PRESETS = {
    ("sdxl", "lora"): _SDXL,
    ("sdxl", "full"): _SDXL | dict(steps=800, lr=2e-6),
    ("sdxl", "textual-inversion"): _SDXL | dict(steps=1500, lr=5e-4),
    ("tiny", "lora"): _TINY,
    ("tiny", "full"): _TINY | dict(steps=1500, lr=1e-4, prior_weight=1.0),
    ("tiny", "textual-inversion"): _TINY | dict(steps=1500, lr=5e-3, prior_weight=1.0),
    ("sdxl", "pivotal"): _SDXL | dict(embedding_lr=5e-4),  # LoRA's, + textual inversion's lr
    ("tiny", "pivotal"): _TINY | dict(embedding_lr=5e-3),
}
VALIDATION_TEMPLATES = ("a painting of {} at Oktoberfest", "a painting of {} in the style of Van "
                        "Gogh", "a painting of {} with blonde hair", "a side view photo of {}",
                        "a photo of {} with sunglasses")
RESUME_OVERRIDES = ("steps", "save_every", "validate_every", "keep_checkpoints", "log_every",
                    "device", "score", "cpu_threads")
# train.py --help's sections, each from its first setting on (TrainConfig's fields are in order)
HELP_SECTIONS = {"subject": "subject", "model": "model", "out": "run", "method": "training",
                 "placeholder_token": "new word (textual inversion, pivotal tuning)",
                 "prior": "prior preservation", "validate_every": "validation"}


class TrainingError(UserError):
    """A setting or situation the user can fix; the message says how."""


def setting(default, help: str, **cli):
    """A TrainConfig field: its default, its one description and argparse extras."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(help=help, **cli))
    return field(default=default, metadata=dict(help=help, **cli))


def _resume_help() -> str:
    flags = ", ".join("--" + s.replace("_", "-") for s in RESUME_OVERRIDES)
    return f"continue run folder RUN from its newest checkpoint (same settings; only {flags} vary)"


@dataclass
class TrainConfig:
    """Every setting of a run (the run's config.json). None: from PRESETS, or as its help says."""

    # -- subject
    subject: str = setting("data/raj", "folder of subject photos (+ subject.json)")
    token: str | None = setting(None, "rare identifier of the subject, e.g. rraj [subject.json]")
    class_noun: str | None = setting(None, "the subject's class, e.g. person, dog [subject.json]")
    instance_prompt: str | None = setting(None, 'prompt of the photos ["a photo of TOKEN CLASS"]')
    class_prompt: str | None = setting(None, 'prompt of the class images ["a photo of CLASS"]')
    # -- model, run folder
    model: str | None = setting(None, "diffusers folder or .safetensors file [SDXL in weights/, "
                                "else the tiny model]")
    vae: str | None = setting(None, "a separate VAE folder/file, e.g. an fp16-fix VAE")
    tokenizer: str | None = setting(None, "folder with tokenizer/ and tokenizer_2/ (single files)")
    base_weights: str = setting("fp16", "the frozen UNet's Linear weights: fp16 = --precision's "
                                "weight dtype, or int8/nf4 quantised (QLoRA)", choices=BASE_WEIGHTS)
    out: str = setting("runs", "where run folders are made")
    resume: str | None = setting(None, _resume_help(), metavar="RUN")
    device: str | None = setting(None, "cuda, cuda:1, cpu, ... [cuda if available]")
    cpu_threads: int | None = setting(None, "torch CPU threads [preset]")
    # -- training
    method: str = setting("lora", "LoRA adapters, every UNet weight, a new word, a new word + "
                          "LoRA (pivotal tuning)", choices=METHODS)
    steps: int | None = setting(None, "optimizer steps [preset]")
    lr: float | None = setting(None, "learning rate of what trains [preset]")
    rank: int = setting(4, "LoRA rank r")
    alpha: float | None = setting(None, "LoRA alpha; the update is scaled by alpha/rank [= rank]")
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch's input while training")
    dora: bool = setting(False, "DoRA: LoRA + a trained length per output channel")
    lora_targets: str | None = setting(None, "UNet layers that get LoRA, comma-separated groups: "
                                       "attn (to_q/k/v/out, as diffusers' script), ff "
                                       "(feed-forward), proj (proj_in/out), conv (ResNet and "
                                       "resampling convs, kohya's LoCon) [preset]")
    resolution: int | None = setting(None, "training image side in px [the model's: SDXL 1024]")
    batch_size: int = setting(1, "subject images per step, plus as many class images")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    precision: str = setting("fp16", "autocast dtype; fp16: loss scaling, fp32 without CUDA",
                             choices=PRECISIONS)
    seed: int = setting(0, "seeds the LoRA init, crops, data order, noise, timesteps, class images")
    gradient_checkpointing: bool | None = setting(None, "recompute activations in backward "
                                                  "[preset]")
    compile: bool = setting(False, "torch.compile the UNet (on a CPU a first run is slower, "
                            "compile time included: benchmarks/RESULTS.md g)")
    optimizer: str = setting("adamw8bit", "bitsandbytes 8-bit AdamW, or torch AdamW (also used, "
                             "with a warning, where bitsandbytes cannot run)", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-4, "AdamW decoupled weight decay")
    max_grad_norm: float = setting(1.0, "clip the gradient's 2-norm to this; 0 = no clipping")
    lr_schedule: str = setting("constant", "learning-rate schedule", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, "linear warmup steps for constant_with_warmup / cosine")
    snr_gamma: float | None = setting(None, "min-SNR loss weights' gamma (Hang et al. 2023; try 5)")
    noise_offset: float = setting(0.0, "offset noise, helps very dark/bright images (try 0.05)")
    flip: bool = setting(True, "random horizontal flips (--no-flip: asymmetric subjects, text)")
    center_crop: bool = setting(False, "centre crops instead of random crops")
    vae_tiling: int = setting(0, "VAE encode/decode in overlapping tiles of this many px, one "
                              "image at a time (512 or 256 on 8 / 6 GB cards); 0 = whole images")
    gpu_memory: float | None = setting(None, "GB of the GPU: use the planner's fastest recipe "
                                       "predicted to fit (flags you pass win)", metavar="GB")
    buckets: bool = setting(True, "each photo trains at the aspect ratio nearest its own, at about "
                            "the resolution's pixel count (--no-buckets: square crops)")
    caption_dropout: float = setting(0.0, "share of subject rows trained with the empty prompt")
    unmasked_weight: float = setting(0.0, "loss weight outside a photo's mask (NN-masklabel.png); "
                                     "0 leaked the least background in the toy world")
    views_per_image: int = setting(4, "augmented crops/flips cached per subject photo")
    train_text_encoder: bool = setting(False, "train both text encoders too: LoRA on them, or with "
                                       "--method full all their weights (more memory; prompts are "
                                       "encoded every step)")
    text_encoder_lr: float = setting(5e-6, "learning rate of the text encoders")
    ema_decay: float = setting(0.0, "EMA of the trained weights (e.g. 0.99): the result and "
                               "validation use it; 0 = off")
    # -- textual inversion
    placeholder_token: str | None = setting(None, "the new word [<TOKEN>, e.g. <rraj>]")
    init_word: str | None = setting(None, "the new word starts as this word [the class noun]")
    num_vectors: int = setting(1, "embedding vectors per text encoder for the new word")
    embedding_lr: float | None = setting(None, "pivotal tuning: the new word's lr [preset]")
    embedding_steps: int = setting(0, "pivotal tuning: the word freezes after this step; 0 = never")
    # -- prior preservation (DreamBooth eq. 2)
    prior: bool = setting(True, "prior preservation with class images (--no-prior: without)")
    prior_weight: float | None = setting(None, "lambda, the class-image loss's weight [preset]")
    class_dir: str | None = setting(None, "folder or .zip of class images; missing ones are "
                                    "generated into it [OUT/class-images/MODEL/PROMPT-RESpx]")
    num_class_images: int | None = setting(None, "class images to use [preset]")
    generate_class_images: bool = setting(True, "generate missing class images "
                                          "(--no-generate-class-images: error if too few)")
    class_steps: int | None = setting(None, "sampler steps per generated class image [preset]")
    class_batch: int | None = setting(None, "class images per UNet call; 0: as many as 80% of the "
                                      "free GPU memory holds (1 on a CPU) [preset]")
    sampler: str | None = setting(None, "sampler of class and validation images: ddim, pndm, "
                                  "euler, dpmpp-2m, dpmpp-2m-karras [preset]")
    guidance_scale: float = setting(5.0, "classifier-free guidance (class, validation images)")
    # -- validation, checkpoints, logs
    validate_every: int | None = setting(None, "steps between validation grids, 0 = never [preset]")
    validation_prompts: list | None = setting(
        None, "a validation prompt; repeat for more [subject.json's, else five edits of the "
        "instance prompt + the class prompt]", flag="--validation-prompt", action="append")
    validation_seeds: list = setting([0, 1], "one grid column per seed", nargs="+", type=int)
    validation_steps: int | None = setting(None, "sampler steps of validation images [preset]")
    save_every: int | None = setting(None, "steps between checkpoints, 0 = at the end [preset]")
    keep_checkpoints: int = setting(2, "newest checkpoints kept, 0 = all")
    log_every: int = setting(10, "steps between log lines (and loss.csv/png rewrites)")
    score: bool = setting(True, "end by scoring the result with the toy judge (toy-world subjects)")


def preset_kind(image_size: int) -> str:
    return "tiny" if image_size <= TINY_MAX_SIZE else "sdxl"


def default_cpu_threads(image_size: int) -> int | None:
    """Torch CPU threads for a model of native side `image_size` (train.py, sample.py, morphs): one
    for tiny models, whose ops are so small that handing each to several threads costs more than the
    math (a 30-step 64 px image: about 1 s with one thread, 16-20 s with torch's default on a busy
    2-core machine); None (torch's default) otherwise."""
    return PRESETS[preset_kind(image_size), "lora"]["cpu_threads"]


def fill_defaults(cfg: TrainConfig, image_size: int) -> str:
    """Fill every None setting from PRESETS for a model of native side `image_size` px; returns a
    note."""
    kind = preset_kind(image_size)
    chosen = {k: v for k, v in PRESETS[kind, cfg.method].items() if getattr(cfg, k) is None}
    if cfg.resolution is None:
        chosen["resolution"] = image_size
    for k, v in chosen.items():
        setattr(cfg, k, v)
    notes = []
    if cfg.method == "textual-inversion" and cfg.prior:
        cfg.prior = False
        notes.append("textual inversion trains without class images: the model is frozen, and "
                     "the class prompt lacks the new word: the prior term would have no gradient")
    unused = set() if cfg.prior else {"num_class_images", "class_steps", "class_batch",
                                      "prior_weight"}
    unused |= set() if cfg.method in ("lora", "pivotal") else {"lora_targets"}
    shown = ", ".join(f"{k} {v}" for k, v in chosen.items() if k not in unused)
    if kind == "tiny" and shown:
        notes.insert(0, f"tiny model ({image_size} px): demo settings {shown} (flags you pass "
                        "override these)")
    return "\n".join(notes)


def check_config(cfg: TrainConfig) -> None:
    """Raise TrainingError for the first setting that cannot work (after fill_defaults)."""
    def need(ok, message):
        if not ok:
            raise TrainingError(message)

    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("steps", "rank", "resolution", "batch_size", "grad_accum", "views_per_image",
                 "class_steps", "validation_steps", "log_every", "num_vectors"):
        need(getattr(cfg, name) >= 1, f"{flag(name)} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("validate_every", "save_every", "keep_checkpoints", "warmup_steps", "noise_offset",
                 "class_batch", "prior_weight", "max_grad_norm", "weight_decay", "embedding_steps"):
        need(getattr(cfg, name) >= 0, f"{flag(name)} must be >= 0 (got {getattr(cfg, name)})")
    need(cfg.cpu_threads is None or cfg.cpu_threads >= 1, "--cpu-threads must be at least 1")
    need(0 < cfg.lr <= 1 and 0 < cfg.text_encoder_lr <= 1,
         f"learning rates must be in (0, 1] (got --lr {cfg.lr}, --text-encoder-lr "
         f"{cfg.text_encoder_lr}): above 1 nothing trains, inf/NaN are no rate")
    need(cfg.embedding_lr is None or 0 < cfg.embedding_lr <= 1,
         f"--embedding-lr must be in (0, 1] (got {cfg.embedding_lr})")
    seeds = [cfg.seed, *cfg.validation_seeds]
    need(all(0 <= s < 2**63 for s in seeds), "seeds must be in 0 .. 2**63 - 1")
    need(1 <= len(cfg.validation_seeds) <= 16, "--validation-seeds: give 1 to 16 seeds (one grid "
         "column each)")
    choices = dict(optimizer=OPTIMIZERS, lr_schedule=LR_SCHEDULES, precision=PRECISIONS,
                   method=METHODS, base_weights=BASE_WEIGHTS)
    for name, allowed in choices.items():
        need(getattr(cfg, name) in allowed,
             f"{flag(name)} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    need(cfg.snr_gamma is None or cfg.snr_gamma > 0, "--snr-gamma must be positive")
    for name in ("lora_dropout", "caption_dropout", "ema_decay"):  # shares, in [0, 1)
        value = getattr(cfg, name)
        need(0 <= value < 1, f"{flag(name)} must be in [0, 1) (got {value})")
    need(0 <= cfg.unmasked_weight <= 1,
         f"--unmasked-weight must be in [0, 1] (got {cfg.unmasked_weight})")
    need(cfg.vae_tiling % 32 == 0 and cfg.vae_tiling >= 0,
         f"--vae-tiling must be 0 (off) or a multiple of 32 px (got {cfg.vae_tiling})")
    need(cfg.resolution % 8 == 0, f"--resolution must be a multiple of 8 (got {cfg.resolution})")
    need(cfg.base_weights == "fp16" or cfg.method != "full", f"--base-weights {cfg.base_weights} "
         "freezes the UNet; --method full trains it: use --base-weights fp16")
    need(not (cfg.method in ("textual-inversion", "pivotal") and cfg.train_text_encoder),
         f"--train-text-encoder does not go with --method {cfg.method}, which trains only the new "
         "word's embedding in the text encoders: drop one of them")
    need(not cfg.dora or cfg.method == "lora", "--dora is a kind of LoRA: use --method lora")
    need(not Path(cfg.out).is_file(),
         f"--out {cfg.out} is a file: give the folder where run folders are made")
    need(cfg.class_dir is None or not Path(cfg.class_dir).is_file(),
         f"--class-dir {cfg.class_dir} is a file: give a folder of class images (or a .zip)")


def slug(text: str, empty: str = "class") -> str:
    """A file-name form of `text`: "a photo of person" -> "a-photo-of-person" (`empty` if nothing is
    left)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or empty
