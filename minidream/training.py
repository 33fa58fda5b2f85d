"""DreamBooth LoRA training for SDXL (Ruiz et al. 2022 + Hu et al. 2021), top to bottom.

    settings -> subject + class images -> model -> cache latents and prompts -> LoRA + optimizer
    -> loop: lr, micro-batches (training_step), apply_gradients, log, validate, checkpoint
    -> final LoRA file

The pieces live in their own files: the loss and one step (step.py), the optimizer, lr schedule
and mixed precision (optim.py), the cached latents and batches (latent_cache.py), class images
(prior.py), the run folder and checkpoints (runs.py). train.py is the command line around train().
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from minidream.checkpoint import detect, unet_weights, vae_weights
from minidream.data import load_images, load_subject
from minidream.files import save_png, write_json
from minidream.latent_cache import (ShuffledOrder, build_cache, draw_batch, load_cache, offload_encoders,
                                    save_cache, VIEWS_PER_INSTANCE_IMAGE)
from minidream.lora import (TEXT_ATTENTION, UNET_ATTENTION, inject_lora, lora_parameters, lora_state_dict,
                            mark_only_lora_trainable)
from minidream.lora_files import save_lora
from minidream.model import default_model_path, load_model
from minidream.optim import (LR_SCHEDULES, OPTIMIZERS, PRECISIONS, make_grad_scaler, make_optimizer, resolve_precision,
                             set_lr)
from minidream.prior import fill_class_folder, plan_class_images
from minidream.runs import (StopRequest, draw_loss_curve, labelled_grid, load_latest_checkpoint, new_run_folder,
                            rng_states, save_checkpoint, set_rng_states, write_loss_csv)
from minidream.schedule import alphas_cumprod as schedule_alphas
from minidream.step import apply_gradients, training_step
from minidream.unet import UNetConfig
from minidream.vae import VAEConfig


class TrainingError(ValueError):
    """A setting or situation the user can fix; the message says how."""


# The seed's T4 recipe (issue 6) and the settings for the bundled tiny model, for every setting left
# at None. A model whose images are at most TINY_MODEL_MAX_SIZE px is "tiny": a CPU demo in minutes.
T4_RECIPE = dict(steps=1000, lr=1e-4, num_class_images=200, gradient_checkpointing=True,
                 validate_every=250, save_every=250, class_steps=30, validation_steps=30)
TINY_RECIPE = dict(steps=300, lr=1e-3, num_class_images=40, gradient_checkpointing=False,
                   validate_every=100, save_every=100, class_steps=20, validation_steps=20, cpu_threads=1)
TINY_MODEL_MAX_SIZE = 128
VALIDATION_TEMPLATES = ("a painting of {} at Oktoberfest", "a painting of {} in the style of Van Gogh",
                        "a painting of {} with blonde hair", "a side view photo of {}", "a photo of {} with sunglasses")
RESUME_OVERRIDES = ("steps", "save_every", "validate_every", "keep_checkpoints", "log_every", "device",
                    "cpu_threads")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for


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
    steps: int | None = None  # optimizer steps
    lr: float | None = None  # UNet LoRA learning rate
    rank: int = 4  # LoRA rank r
    alpha: float | None = None  # LoRA alpha (None: = rank, scaling 1)
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
    train_text_encoder: bool = False  # LoRA on both text encoders' q/k/v/out_proj too
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
    recipe = TINY_RECIPE if tiny else T4_RECIPE
    chosen = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    if cfg.resolution is None:
        chosen["resolution"] = size
    for k, v in chosen.items():
        setattr(cfg, k, v)
    if not tiny or not chosen:
        return ""
    return (f"tiny model ({size} px): demo settings " + ", ".join(f"{k} {v}" for k, v in chosen.items())
            + " (flags you pass override these)")


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


# ----------------------------------------------------------------------------- helpers of the loop

def validate(model, prompts, seeds, cfg: TrainConfig, step: int, run: Path, device) -> Path:
    """A grid (one row per prompt, one column per seed) from the current LoRA, with fixed seeds."""
    from minidream.pipeline import generate

    parts = [model.vae, model.text.text_encoder, model.text.text_encoder_2]
    homes = [None if p is None else next(p.parameters()).device for p in parts]
    for p in parts:  # the VAE and text encoders come back to the GPU only for this
        if p is not None:
            p.to(device)
    images = [generate(model, prompt, sampler="ddim", steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale,
                       seed=seed, height=cfg.resolution, width=cfg.resolution, progress=False)[0]
              for prompt in prompts for seed in seeds]
    for p, home in zip(parts, homes):
        if p is not None:
            p.to(home)
    grid = labelled_grid(images, prompts, columns=len(seeds))
    metadata = {"step": step, "prompts": prompts, "seeds": seeds}
    return save_png(run / "validation" / f"step-{step:06d}.png", grid, metadata)


def adapted_models(model, cfg):
    """{file component: module} of the models carrying LoRA."""
    models = {"unet": model.unet}
    if cfg.train_text_encoder:
        models.update(text_encoder=model.text.text_encoder, text_encoder_2=model.text.text_encoder_2)
    return {k: v for k, v in models.items() if v is not None}


def write_lora(path, model, cfg, subject, step) -> Path:
    models = adapted_models(model, cfg)
    return save_lora(path, **models, token=subject.token, class_noun=subject.class_noun, steps=step,
                     base_model=model.name)


def log_line(row: dict, total: int, skipped: int) -> str:
    prior = f", prior {row['prior_loss']:.4f}" if row["prior_loss"] else ""
    return (f"step {row['step']:>5}/{total} | loss {row['loss']:.4f} (subject {row['instance_loss']:.4f}{prior}) "
            f"| lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | {row['seconds']:.2f} s/step"
            + (f" | {skipped} skipped (inf/NaN)" if skipped else ""))


# ----------------------------------------------------------------------------- train

def train(cfg: TrainConfig) -> Path:
    """Run (or, with cfg.resume, continue) a DreamBooth LoRA training; returns the run folder."""
    # -- settings: cheap checks first, so bad input fails before anything heavy is loaded
    cfg = resumed_config(cfg) if cfg.resume else TrainConfig(**asdict(cfg))
    if cfg.model is None:
        path, why = default_model_path()
        cfg.model = str(path)
        print(f"model: {path} ({why})")
    else:
        print(f"model: {cfg.model}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(cfg.precision, device)
    if precision.note:
        print(f"note: {precision.note}")
    subject = load_subject(cfg.subject, cfg.token, cfg.class_noun, cfg.instance_prompt, cfg.class_prompt)
    if not Path(cfg.model).exists():
        raise TrainingError(f"model {cfg.model} does not exist: pass --model DIR|FILE (see README 'Real SDXL on a T4')")
    note = fill_defaults(cfg, model_image_size(cfg.model))
    if note and not cfg.resume:
        print(note)
    check_config(cfg)
    if cfg.cpu_threads and device.type == "cpu":
        # Tiny tensors: handing each op to several threads costs more than the math, and on a busy
        # machine threads wait for each other (measured here: 20 ms vs 380 ms per tiny-UNet forward).
        torch.set_num_threads(cfg.cpu_threads)
    instance_images = load_images(subject.images, cfg.resolution, "instance")  # unreadable photos fail here
    plan = None
    if cfg.prior:
        if cfg.class_dir is None:
            folder = f"{slug(subject.class_prompt)}-{cfg.resolution}px"  # class images depend on both
            cfg.class_dir = str(Path(cfg.out) / "class-images" / Path(cfg.model).stem / folder)
        plan = plan_class_images(cfg.class_dir, cfg.num_class_images, cfg.generate_class_images)
    run = Path(cfg.resume) if cfg.resume else new_run_folder(cfg.out, subject.folder.name)
    if not cfg.resume:
        write_json(run / "config.json", asdict(cfg))
    print(f"run folder: {run}")

    # -- model, class images, cache; then the VAE and text encoders leave the GPU
    model = load_model(cfg.model, precision.weight_dtype, device, vae=cfg.vae, tokenizer=cfg.tokenizer)
    class_paths = []
    if plan is not None:
        class_paths = fill_class_folder(plan, model, subject.class_prompt, resolution=cfg.resolution, seed=cfg.seed,
                                        steps=cfg.class_steps, guidance_scale=cfg.guidance_scale)
    fingerprint = json.dumps([cfg.model, cfg.resolution, cfg.seed, cfg.flip, cfg.center_crop, cfg.views_per_image,
                              subject.instance_prompt, subject.class_prompt, cfg.train_text_encoder,
                              [(p.name, p.stat().st_size) for p in [*(p for p, _ in instance_images), *class_paths]]])
    cache = load_cache(run / "cache.safetensors", fingerprint) if cfg.resume else None
    if cache is None:
        cache = build_cache(model, instance_images, class_paths, resolution=cfg.resolution,
                            instance_prompt=subject.instance_prompt, class_prompt=subject.class_prompt, seed=cfg.seed,
                            flip=cfg.flip, center_crop=cfg.center_crop, cache_text=not cfg.train_text_encoder,
                            views_per_image=cfg.views_per_image)
        save_cache(run / "cache.safetensors", cache, fingerprint)
    offload_encoders(model, keep_text=cfg.train_text_encoder)

    # -- LoRA (fp32) on the frozen model, optimizer, loss scaler, the training generator
    torch.manual_seed(cfg.seed)  # LoRA init
    unet = model.unet
    inject_lora(unet, UNET_ATTENTION, rank=cfg.rank, alpha=cfg.alpha)
    unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    groups = [{"params": lora_parameters(unet), "lr": cfg.lr}]
    if cfg.train_text_encoder:
        for encoder in (model.text.text_encoder, model.text.text_encoder_2):
            if encoder is not None:
                inject_lora(encoder, TEXT_ATTENTION, rank=cfg.rank, alpha=cfg.alpha)
                encoder.train()  # CLIP's dropout is 0; transformers only checkpoints in train mode
                if cfg.gradient_checkpointing:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                groups.append({"params": lora_parameters(encoder), "lr": cfg.text_encoder_lr})
    models = adapted_models(model, cfg)
    for m in models.values():
        mark_only_lora_trainable(m)
    unet.train()
    params = [p for g in groups for p in g["params"]]
    optimizer, optimizer_name = make_optimizer(groups, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = make_grad_scaler(precision)
    generator = torch.Generator().manual_seed(cfg.seed)
    instance_order = ShuffledOrder(cache.instance.num_images, generator)
    class_order = ShuffledOrder(cache.classes.num_images, generator) if cache.classes is not None else None
    alphas = schedule_alphas(model.schedule).to(device)
    if cfg.train_text_encoder:
        from minidream.text import _encode  # with gradients (encode_prompt is no_grad)

        prompts = [subject.instance_prompt, subject.class_prompt]
        embed_prompts = lambda: _encode(model.text, prompts)  # noqa: E731
    else:
        context, pooled = cache.context.to(device), None if cache.pooled is None else cache.pooled.to(device)
        embed_prompts = lambda: (context, pooled)  # noqa: E731
    prompts_to_watch = cfg.validation_prompts or subject.validation_prompts or (
        [t.format(f"{subject.token} {subject.class_noun}") for t in VALIDATION_TEMPLATES] + [subject.class_prompt])

    # -- resume: every piece of state a step reads comes back from the checkpoint
    step, skipped, history = 0, 0, []
    if cfg.resume:
        path, state = load_latest_checkpoint(run)
        if state is not None:
            for name, m in models.items():
                if set(state["lora"].get(name, {})) != set(lora_state_dict(m)):
                    raise TrainingError(f"{path} holds another LoRA layout for {name} than this run builds "
                                        "(was config.json edited?); start a new run instead")
                m.load_state_dict(state["lora"][name], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            set_rng_states(state["rng"], generator)
            instance_order.load_state_dict(state["instance_order"])
            if class_order is not None:
                class_order.load_state_dict(state["class_order"])
            step, skipped, history = state["step"], state["skipped"], state["history"]
            print(f"resuming from {path} (step {step})")

    def checkpoint():
        try:
            write_lora(run / "checkpoints" / f"step-{step:06d}.safetensors", model, cfg, subject, step)
            save_checkpoint(run, step, {
                "step": step, "skipped": skipped, "history": history, "optimizer_name": optimizer_name,
                "lora": {name: lora_state_dict(m) for name, m in models.items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(generator),
                "instance_order": instance_order.state_dict(),
                "class_order": class_order.state_dict() if class_order is not None else None,
            }, keep=cfg.keep_checkpoints)
        except OSError as e:
            raise TrainingError(f"could not write the step-{step} checkpoint ({e.strerror or e}); earlier checkpoints "
                                f"are intact: free disk space, then `python train.py --resume {run}`") from None

    def write_logs():
        write_loss_csv(run / "loss.csv", history)
        save_png(run / "loss.png", draw_loss_curve(history))

    # -- the loop
    base_lrs = [g["lr"] for g in groups]
    trainable = sum(p.numel() for p in params)
    print(f"training {trainable:,} LoRA parameters for {cfg.steps} steps on {device} ({precision.name}, "
          f"{optimizer_name}, batch {cfg.batch_size}x{cfg.grad_accum}, {'prior on' if plan else 'no prior'})")
    if step == 0 and cfg.validate_every:
        validate(model, prompts_to_watch, cfg.validation_seeds, cfg, 0, run, device)
    with StopRequest() as stop:
        while step < cfg.steps and not stop.requested:
            start = time.perf_counter()
            set_lr(optimizer, step, base_lrs, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
            parts = []
            for _ in range(cfg.grad_accum):
                batch = draw_batch(cache, instance_order, class_order, cfg.batch_size, generator,
                                   scaling_factor=model.vae.config.scaling_factor,
                                   num_timesteps=model.schedule.num_train_timesteps, noise_offset=cfg.noise_offset,
                                   sdxl=model.is_sdxl, device=device)
                parts.append(training_step(unet, batch, embed_prompts, alphas,
                                           prediction_type=model.schedule.prediction_type,
                                           prior_weight=cfg.prior_weight, snr_gamma=cfg.snr_gamma,
                                           autocast_dtype=precision.autocast_dtype, scaler=scaler,
                                           accumulation=cfg.grad_accum))
            lr = optimizer.param_groups[0]["lr"]
            grad_norm, applied = apply_gradients(optimizer, params, scaler, cfg.max_grad_norm)
            step += 1
            skipped += not applied
            history.append({
                "step": step, "lr": lr, "grad_norm": grad_norm, "skipped": int(not applied),
                "loss": sum(p.loss.item() for p in parts) / len(parts),
                "instance_loss": sum(p.instance.item() for p in parts) / len(parts),
                "prior_loss": sum(p.prior.item() for p in parts) / len(parts),
                "seconds": time.perf_counter() - start,
            })
            if not applied:
                print(f"step {step}: gradient is inf/NaN, update skipped ({skipped} so far)")
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                print(log_line(history[-1], cfg.steps, skipped))
                write_logs()
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                validate(model, prompts_to_watch, cfg.validation_seeds, cfg, step, run, device)
            if (cfg.save_every and step % cfg.save_every == 0) or stop.requested or step == cfg.steps:
                checkpoint()
    write_logs()
    if step < cfg.steps:
        print(f"stopped at step {step}; continue with: python train.py --resume {run}")
        return run
    lora = write_lora(run / LORA_FILE, model, cfg, subject, step)
    print(f"done: {lora} ({skipped} step(s) skipped for inf/NaN gradients)\n"
          f"try it: python sample.py --lora {lora} --prompt \"{prompts_to_watch[0]}\"")
    return run
