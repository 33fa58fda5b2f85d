"""DreamBooth training for SDXL (Ruiz et al. 2022) with LoRA (Hu et al. 2021), top to bottom:

    train(): settings -> subject photos + class images -> model -> cached latents and prompts
             -> what trains (method.py) + optimizer -> the loop -> the result
    loop:    lr -> micro-batches: draw_batch (latent_cache.py), training_step (step.py)
             -> apply_gradients (step.py) -> log, validate, checkpoint

Other methods (minidream/methods/), reading models from disk (minidream/formats/) and several GPUs
(minidream/parallel/) come in through train()'s arguments; train.py chooses them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minidream.config import (VALIDATION_TEMPLATES, TrainConfig, TrainingError, check_config,
                              fill_defaults, slug)
from minidream.data import load_images, load_masks, load_subject
from minidream.drawing import draw_loss_curve, labelled_grid
from minidream.files import save_png, write_json
from minidream.latent_cache import build_cache, draw_batch, load_cache, offload_encoders, save_cache
from minidream.lora import unet_targets
from minidream.method import LoRA, Method
from minidream.optim import make_grad_scaler, resolve_precision, set_lr
from minidream.pipeline import generate
from minidream.prior import fill_class_folder, plan_class_images
from minidream.progress import Progress, log_line, new_progress, record
from minidream.runs import (StopRequest, Stopped, load_latest_checkpoint, new_run_folder,
                            save_checkpoint, write_loss_csv)
from minidream.samplers import SAMPLERS
from minidream.schedule import alphas_cumprod
from minidream.step import apply_gradients, training_step
from minidream.text import encode_text

class OneProcess:
    """Training in this one process: every collective operation is the identity.
    minidream.parallel.distributed.Dist does them for several processes under torchrun."""

    rank, world_size, device, is_main, enabled = 0, 1, None, True, False

    def barrier(self): pass  # one line each: every one is the identity
    def broadcast(self, obj): return obj
    def mean(self, values): return values
    def any(self, flag): return flag
    def shard(self, batch): return batch
    def wrap(self, unet, text_modules, find_unused): return unet
    def accumulating(self, model, last_micro_step): return contextlib.nullcontext()


@dataclass
class PromptTable:
    """The prompts a step reads (the cache's table: instance, class, then the photos' captions),
    called by training_step inside its autocast: the cached embeddings, or, when gradients must
    reach the text encoders (text-encoder LoRA or full training, textual inversion), encoded
    anew."""

    prompts: list[str]
    text: object | None  # the TextEncoders when they train, else None
    context: torch.Tensor | None  # (P, L, D) cached
    pooled: torch.Tensor | None  # (P, Dp) cached; None for SD 1.x / 2.x

    def __call__(self):
        return encode_text(self.text, self.prompts) if self.text else (self.context, self.pooled)


# ----------------------------------------------------------------------------- train

def train(cfg: TrainConfig, method_class: type[Method] = LoRA, dist=None, *, models,
          sampler_table: dict = SAMPLERS) -> Path:
    """Run a DreamBooth training or continue one (cfg: cli.args.resumed_config); returns the run.

    method_class: what trains (LoRA; minidream.methods: full fine-tuning, textual inversion).
    dist: OneProcess(), or minidream.parallel.distributed.setup() under torchrun. models: what
    reads model paths (minidream.formats). sampler_table: cfg.sampler's choices (more_samplers)."""
    dist = dist or OneProcess()
    cfg, subject, device, precision, sampler = settings(cfg, method_class, dist, models,
                                                        sampler_table)  # cheap checks
    instance_images = load_images(subject.images, cfg.resolution)  # unreadable photos fail here
    masks = load_masks(instance_images, subject.masks)  # a bad mask fails here
    plan = (plan_class_images(cfg.class_dir, cfg.num_class_images, cfg.generate_class_images)
            if cfg.prior else None)
    run = open_run_folder(cfg, subject.folder.name, dist)

    # -- model, class images, cached latents and prompts; then the VAE and text encoders leave
    model = models.load_model(cfg.model, precision.weight_dtype, device, vae=cfg.vae,
                              tokenizer=cfg.tokenizer, base_weights=cfg.base_weights)
    trains_text = method_class.trains_text(cfg)
    cache = prepare_cache(model, cfg, subject, instance_images, masks, plan, run, dist,
                          not trains_text, sampler)
    offload_encoders(model, keep_text=trains_text)

    # -- what trains (LoRA adapters), the optimizer, the fp16 loss scaler, the loop's random state
    torch.manual_seed(cfg.seed)  # LoRA init
    method = method_class(model, cfg, subject.token, subject.class_noun)
    optimizer, optimizer_name = method.make_optimizer()  # + the method's hooks (EMA, ...)
    scaler, progress = make_grad_scaler(precision), new_progress(cfg.seed, cache)
    if cfg.resume:
        resume(run, method, optimizer, scaler, progress)
    prompts = PromptTable([method.prompt(p) for p in cache.prompts],
                          model.text if trains_text else None, *cached_prompts(cache, device))
    if cfg.compile:  # in place (state_dict keys kept), after the adapters exist
        model.unet.compile()
    text_modules = {k: m for k, m in method.trained_modules().items() if k != "unet"}
    denoiser = dist.wrap(model.unet, text_modules, find_unused=cfg.train_text_encoder)
    alpha_bar = alphas_cumprod(model.schedule).to(device)  # the noise schedule's table
    prediction = model.schedule.prediction_type  # eps or v
    validation = validation_prompts(cfg, subject, method)
    params, base_lrs = method.parameters(), [g["lr"] for g in optimizer.param_groups]
    print(start_line(cfg, method, device, precision, optimizer_name, dist))
    if progress.step == 0 and cfg.validate_every:
        validate(method, validation, cfg, run, device, dist, sampler, step=0)

    # -- the loop
    with StopRequest() as stop:
        stopping = dist.any(stop.requested)  # a signal on any rank stops all after the same step
        while progress.step < cfg.steps and not stopping:
            start = time.perf_counter()
            set_lr(optimizer, progress.step, base_lrs, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
            losses = []
            for micro in range(cfg.grad_accum):
                batch = draw_batch(  # every rank draws the global batch, then keeps its rows
                    cache, progress.instance_orders, progress.class_orders,
                    cfg.batch_size * dist.world_size, progress.generator, device=device,
                    scaling_factor=model.vae.config.scaling_factor, sdxl=model.is_sdxl,
                    num_timesteps=model.schedule.num_train_timesteps, noise_offset=cfg.noise_offset,
                    caption_dropout=cfg.caption_dropout, unmasked_weight=cfg.unmasked_weight)
                with dist.accumulating(denoiser, last_micro_step=micro == cfg.grad_accum - 1):
                    losses.append(training_step(
                        denoiser, dist.shard(batch), prompts, alpha_bar, prediction_type=prediction,
                        prior_weight=cfg.prior_weight, snr_gamma=cfg.snr_gamma, scaler=scaler,
                        autocast_dtype=precision.autocast_dtype, accumulation=cfg.grad_accum))
            lr = optimizer.param_groups[0]["lr"]
            grad_norm, applied = apply_gradients(optimizer, params, scaler, cfg.max_grad_norm)
            step = record(progress, losses, lr, grad_norm, applied, start, dist, device)
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                print(log_line(progress.history, cfg.steps, progress.skipped))
                write_logs(run, progress.history, dist)
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                validate(method, validation, cfg, run, device, dist, sampler, step)
            stopping = dist.any(stop.requested)
            if (cfg.save_every and step % cfg.save_every == 0) or stopping or step == cfg.steps:
                save_training_state(run, cfg, method, optimizer, optimizer_name, scaler, progress,
                                    dist)
    write_logs(run, progress.history, dist)
    return finish(run, cfg, method, progress, dist, method.prompt(subject.instance_prompt),
                  stopped_by=stop.signum)


# ----------------------------------------------------------------------------- before the loop

def settings(cfg: TrainConfig, method_class: type[Method], dist, models, sampler_table: dict):
    """The run's settings (presets filled, everything checked), subject, device, precision and the
    sampler of class images and validation grids."""
    if cfg.resume and cfg.model is None:  # resumed_config's settings always name the model
        raise TrainingError("to continue a run, pass cli.args.resumed_config(cfg): its settings")
    if cfg.method != method_class.name:
        raise TrainingError(f"--method {cfg.method} needs its method class (train.py chooses it)")
    cfg, why = TrainConfig(**asdict(cfg)), ""
    if cfg.model is None:
        path, why = models.default_model_path()
        cfg.model, why = str(path), f" ({why})"
    print(f"model: {cfg.model}{why}")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = dist.device or torch.device(cfg.device or default_device)
    precision = resolve_precision(cfg.precision, device)
    if precision.note:
        print(f"note: {precision.note}")
    subject = load_subject(cfg.subject, cfg.token, cfg.class_noun, cfg.instance_prompt,
                           cfg.class_prompt)
    if not Path(cfg.model).exists():
        raise TrainingError(f"model {cfg.model} does not exist: --model DIR|FILE (docs/gpus.md)")
    note = fill_defaults(cfg, models.model_image_size(cfg.model))
    if note and not cfg.resume:
        print(note)
    check_config(cfg)
    try:
        unet_targets(cfg.lora_targets)
    except ValueError as e:
        raise TrainingError(f"--lora-targets: {e}") from None
    method_class.check_subject(cfg, subject)
    if cfg.cpu_threads and device.type == "cpu":  # the preset's: config.default_cpu_threads
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.prior and cfg.class_dir is None:  # class images depend on the prompt and the resolution
        folder = f"{slug(subject.class_prompt)}-{cfg.resolution}px"
        cfg.class_dir = str(Path(cfg.out) / "class-images" / Path(cfg.model).stem / folder)
    if cfg.sampler not in sampler_table:
        raise TrainingError(f"--sampler: one of {', '.join(sampler_table)}, not {cfg.sampler!r} "
                            "(train(..., sampler_table=more_samplers.SAMPLERS) knows them all)")
    return cfg, subject, device, precision, sampler_table[cfg.sampler]


def open_run_folder(cfg: TrainConfig, subject_name: str, dist) -> Path:
    """A new run folder with the run's config.json (rank 0 names it from the clock), or the
    resumed one, rid of files a killed process left half-written."""
    if cfg.resume:
        run = Path(cfg.resume)
        for leftover in run.rglob(".*.tmp") if dist.is_main else []:
            leftover.unlink(missing_ok=True)
    else:
        run = dist.broadcast(new_run_folder(cfg.out, subject_name) if dist.is_main else None)
        if dist.is_main:
            write_json(run / "config.json", asdict(cfg))
    ranks = f" ({dist.world_size} processes, this is rank {dist.rank})" if dist.enabled else ""
    print(f"run folder: {run}{ranks}")
    return run


def prepare_cache(model, cfg, subject, instance_images, masks, plan, run: Path, dist,
                  cache_text: bool, sampler):
    """Fill the class folder (each rank its share), then encode images and prompts once (rank 0;
    the other ranks read rank 0's file, so every rank trains on the same latents). A resumed run
    reads its cache back when it was made from the same inputs."""
    class_paths = []
    if plan is not None:
        class_paths = fill_class_folder(plan, model, subject.class_prompt, seed=cfg.seed,
                                        resolution=cfg.resolution, steps=cfg.class_steps,
                                        guidance_scale=cfg.guidance_scale, sampler=sampler,
                                        batch=cfg.class_batch, dist=dist)
    photos = [p for p, _ in instance_images]
    files = [(p.name, p.stat().st_size) for p in [*photos, *subject.masks.values(), *class_paths]]
    fingerprint = json.dumps([cfg.model, cfg.resolution, cfg.seed, cfg.flip, cfg.center_crop,
                              cfg.views_per_image, subject.instance_prompt, subject.class_prompt,
                              cache_text, files, cfg.buckets, cfg.caption_dropout > 0,
                              [subject.captions.get(p) for p in photos]])
    path = run / "cache.safetensors"
    cache = load_cache(path, fingerprint) if cfg.resume else None
    if cache is None and dist.is_main:
        cache = build_cache(model, instance_images, class_paths, resolution=cfg.resolution,
                            instance_prompt=subject.instance_prompt, seed=cfg.seed,
                            class_prompt=subject.class_prompt, flip=cfg.flip,
                            captions=subject.captions, masks=masks, buckets=cfg.buckets,
                            empty_prompt=cfg.caption_dropout > 0, center_crop=cfg.center_crop,
                            cache_text=cache_text, views_per_image=cfg.views_per_image)
        save_cache(path, cache, fingerprint)
    dist.barrier()  # rank 0's cache file is complete
    if cache is None:
        cache = load_cache(path, fingerprint)
        if cache is None:
            raise TrainingError(f"rank {dist.rank} cannot read {path}, which rank 0 wrote: the run "
                                "folder must be on a file system every process sees")
    return cache


def cached_prompts(cache, device) -> tuple:
    """The cached (context (2, L, D), pooled (2, Dp) or None), on the training device."""
    if cache.context is None:  # the text encoders train: nothing cached
        return None, None
    return cache.context.to(device), None if cache.pooled is None else cache.pooled.to(device)


def validation_prompts(cfg: TrainConfig, subject, method: Method) -> list[str]:
    prompts = cfg.validation_prompts or subject.validation_prompts or (
        [t.format(f"{subject.token} {subject.class_noun}") for t in VALIDATION_TEMPLATES]
        + [subject.class_prompt])
    return [method.prompt(p) for p in prompts]


def resume(run: Path, method: Method, optimizer, scaler, progress: Progress) -> None:
    """Every piece of state a step reads comes back from the run's newest readable checkpoint."""
    path, state = load_latest_checkpoint(run)
    if state is not None:
        method.load_state_dict(state["trained"], where=str(path))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        progress.load_state_dict(state)
        print(f"resuming from {path} (step {progress.step})")


def start_line(cfg: TrainConfig, method: Method, device, precision, optimizer_name, dist) -> str:
    processes = f" x {dist.world_size} processes" if dist.enabled else ""
    return (f"training {method.summary()} for {cfg.steps} steps on {device} ({precision.name}, "
            f"{optimizer_name}, batch {cfg.batch_size}x{cfg.grad_accum}{processes}, "
            f"{'prior on' if cfg.prior else 'no prior'})")


# ----------------------------------------------------------------------------- in the loop

def write_logs(run: Path, history: list[dict], dist) -> None:
    if dist.is_main:
        write_loss_csv(run / "loss.csv", history)
        save_png(run / "loss.png", draw_loss_curve(history))


def validate(method: Method, prompts, cfg: TrainConfig, run: Path, device, dist, sampler,
             step: int) -> Path | None:
    """A grid (a row per prompt, a column per seed) from the result's weights as they are now."""
    path, model = None, method.model
    if dist.is_main:
        text = model.text
        parts = [p for p in (model.vae, text.text_encoder, text.text_encoder_2) if p is not None]
        homes = [next(p.parameters()).device for p in parts]
        modes = {m: m.training for m in (model.unet, *parts)}
        for p in parts:  # the VAE and text encoders come back to the GPU only for this
            p.to(device)
        for m in modes:  # eval mode: no LoRA dropout in the pictures
            m.eval()
        with method.result_weights():
            images = [generate(model, prompt, sampler=sampler, steps=cfg.validation_steps,
                               seed=seed, guidance_scale=cfg.guidance_scale, height=cfg.resolution,
                               width=cfg.resolution, progress=False)[0]
                      for prompt in prompts for seed in cfg.validation_seeds]
        for m, was_training in modes.items():
            m.train(was_training)
        for p, home in zip(parts, homes):
            p.to(home)
        grid = labelled_grid(images, prompts, [f"seed {seed}" for seed in cfg.validation_seeds])
        metadata = {"step": step, "prompts": prompts, "seeds": cfg.validation_seeds}
        path = save_png(run / "validation" / f"step-{step:06d}.png", grid, metadata)
    dist.barrier()
    return path


def require_finite(method: Method, step: int) -> None:
    """Never write a result or checkpoint holding inf/NaN (it would draw black images)."""
    tensors = [t for part in method.state_dict().values() for t in part.values()]
    if not all(t.isfinite().all() for t in tensors):
        raise TrainingError(f"the trained values hold inf/NaN at step {step} (the learning rate is "
                            "too high?); nothing was written: the run folder keeps its last good "
                            "checkpoint")


def save_training_state(run: Path, cfg: TrainConfig, method: Method, optimizer, optimizer_name: str,
                        scaler, progress: Progress, dist) -> None:
    """checkpoints/step-N.pt: the trained tensors, optimizer, scaler and Progress (rank 0)."""
    if not dist.is_main:
        return
    step = progress.step
    require_finite(method, step)
    state = progress.state_dict() | {
        "optimizer_name": optimizer_name, "method": cfg.method, "trained": method.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    try:
        if method.checkpoint_result:
            method.save(run / "checkpoints" / f"step-{step:06d}{Path(method.output).suffix}", step)
        save_checkpoint(run, step, state, keep=cfg.keep_checkpoints)
    except OSError as e:
        raise TrainingError(f"could not write the step-{step} checkpoint ({e.strerror or e}); "
                            "earlier checkpoints are intact: free disk space, then "
                            f"`python train.py --resume {run}`") from None


def finish(run: Path, cfg: TrainConfig, method: Method, progress: Progress, dist,
           example_prompt: str, stopped_by: int | None = None) -> Path:
    """Write the result (rank 0) and say how to use it. A run stopped by Ctrl-C or SIGTERM (its
    checkpoint saved) says how to continue it and raises Stopped, as an unhandled signal would end
    it. stopped_by: the signal this rank received (None on a rank another rank's signal stopped)."""
    if progress.step < cfg.steps:
        print(f"stopped at step {progress.step}; continue with: python train.py --resume {run}")
        raise Stopped(stopped_by or signal.SIGINT)
    if dist.is_main:
        require_finite(method, progress.step)
        result = method.save(run / method.output, progress.step)
        use = f'python sample.py {method.sample_flag} {result} --prompt "{example_prompt}"'
        print(f"done: {result} ({progress.skipped} step(s) skipped for inf/NaN gradients)\n"
              f"try it: {use}")
    return run
