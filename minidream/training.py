"""DreamBooth training for SDXL (Ruiz et al. 2022), top to bottom: LoRA (Hu et al. 2021), full
fine-tuning or textual inversion (Gal et al. 2022), on one GPU or several (torchrun).

    settings -> subject + class images -> model -> cache latents and prompts -> method + optimizer
    -> loop: lr, micro-batches (training_step), apply_gradients, log, validate, checkpoint
    -> the result: a LoRA file, a model folder or an embedding file

The pieces live in their own files: what each method trains and writes (methods.py,
full_finetune.py, textual_inversion.py), the loss and one step (step.py), the optimizer, lr schedule
and mixed precision (optim.py), the cached latents and batches (latent_cache.py), class images
(prior.py), the run folder and checkpoints (runs.py), several GPUs (distributed.py), the settings
(train_config.py). train.py is the command line around train().
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minidream import distributed
from minidream.data import load_images, load_subject
from minidream.distributed import Dist
from minidream.files import save_png, write_json
from minidream.latent_cache import ShuffledOrder, build_cache, draw_batch, load_cache, offload_encoders, save_cache
from minidream.methods import build_method, method_class
from minidream.model import default_model_path, load_model
from minidream.optim import make_grad_scaler, make_optimizer, resolve_precision, set_lr
from minidream.prior import fill_class_folder, plan_class_images
from minidream.runs import (StopRequest, draw_loss_curve, labelled_grid, load_latest_checkpoint, new_run_folder,
                            rng_states, save_checkpoint, set_rng_states, write_loss_csv)
from minidream.schedule import alphas_cumprod as schedule_alphas
from minidream.step import apply_gradients, training_step
from minidream.text import encode_text
from minidream.train_config import (VALIDATION_TEMPLATES, TrainConfig, TrainingError, check_config, fill_defaults,
                                    model_image_size, resumed_config, slug)


# ----------------------------------------------------------------------------- helpers of the loop

def validate(model, prompts, seeds, cfg: TrainConfig, step: int, run: Path, device) -> Path:
    """A grid (one row per prompt, one column per seed) from the model as it is now, with fixed seeds."""
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


def prompt_embedder(model, cache, prompts: list[str], trains_text: bool, device):
    """The embed_prompts() of training_step: the cached table, or the text encoders run anew (when
    gradients must reach them: text-encoder LoRA, full text-encoder training, textual inversion)."""
    if trains_text:
        return lambda: encode_text(model.text, prompts)  # with gradients (encode_prompt is no_grad)
    context, pooled = cache.context.to(device), None if cache.pooled is None else cache.pooled.to(device)
    return lambda: (context, pooled)


def prepare_cache(model, cfg, subject, instance_images, plan, run: Path, dist: Dist, cache_text: bool):
    """Fill the class folder (each rank its share), then encode images and prompts once (rank 0; the
    other ranks read rank 0's file, so every rank trains on the same latents). A resumed run reads
    its cache back when it was made from the same inputs."""
    class_paths = []
    if plan is not None:
        class_paths = fill_class_folder(plan, model, subject.class_prompt, resolution=cfg.resolution, seed=cfg.seed,
                                        steps=cfg.class_steps, guidance_scale=cfg.guidance_scale, dist=dist)
    fingerprint = json.dumps([cfg.model, cfg.resolution, cfg.seed, cfg.flip, cfg.center_crop, cfg.views_per_image,
                              subject.instance_prompt, subject.class_prompt, cache_text,
                              [(p.name, p.stat().st_size) for p in [*(p for p, _ in instance_images), *class_paths]]])
    path = run / "cache.safetensors"
    cache = load_cache(path, fingerprint) if cfg.resume else None
    if cache is None and dist.is_main:
        cache = build_cache(model, instance_images, class_paths, resolution=cfg.resolution,
                            instance_prompt=subject.instance_prompt, class_prompt=subject.class_prompt, seed=cfg.seed,
                            flip=cfg.flip, center_crop=cfg.center_crop, cache_text=cache_text,
                            views_per_image=cfg.views_per_image)
        save_cache(path, cache, fingerprint)
    dist.barrier()  # rank 0's cache file is complete
    if cache is None:
        cache = load_cache(path, fingerprint)
        if cache is None:
            raise TrainingError(f"rank {dist.rank} cannot read {path}, which rank 0 wrote: the run folder must be "
                                "on a file system every process sees")
    return cache


def log_line(row: dict, total: int, skipped: int) -> str:
    prior = f", prior {row['prior_loss']:.4f}" if row["prior_loss"] else ""
    return (f"step {row['step']:>5}/{total} | loss {row['loss']:.4f} (subject {row['instance_loss']:.4f}{prior}) "
            f"| lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | {row['seconds']:.2f} s/step"
            + (f" | {skipped} skipped (inf/NaN)" if skipped else ""))


# ----------------------------------------------------------------------------- train

def train(cfg: TrainConfig) -> Path:
    """Run (or, with cfg.resume, continue) a DreamBooth training; returns the run folder."""
    # -- settings: cheap checks first, so bad input fails before anything heavy is loaded
    cfg = resumed_config(cfg) if cfg.resume else TrainConfig(**asdict(cfg))
    if cfg.model is None:
        path, why = default_model_path()
        cfg.model = str(path)
        print(f"model: {path} ({why})")
    else:
        print(f"model: {cfg.model}")
    dist = distributed.setup(cfg.device)  # one process, or this process's rank under torchrun
    device = dist.device or torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    method_class(cfg.method).check_subject(cfg, subject)
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
    if cfg.resume:
        run = Path(cfg.resume)
    else:  # rank 0 names the run folder (from the clock), the other ranks learn its name
        run = dist.broadcast(new_run_folder(cfg.out, subject.folder.name) if dist.is_main else None)
        if dist.is_main:
            write_json(run / "config.json", asdict(cfg))
    print(f"run folder: {run}" + (f" ({dist.world_size} processes, this is rank {dist.rank})" if dist.enabled else ""))

    # -- model, class images, cache; then the VAE and text encoders leave the GPU
    model = load_model(cfg.model, precision.weight_dtype, device, vae=cfg.vae, tokenizer=cfg.tokenizer)
    trains_text = method_class(cfg.method).trains_text(cfg)
    cache = prepare_cache(model, cfg, subject, instance_images, plan, run, dist, cache_text=not trains_text)
    offload_encoders(model, keep_text=trains_text)

    # -- the method (LoRA / full / textual inversion), optimizer, loss scaler, the training generator
    torch.manual_seed(cfg.seed)  # LoRA init
    method = build_method(model, cfg, subject.token, subject.class_noun)
    instance_prompt = method.prompt(subject.instance_prompt)
    groups, params = method.param_groups(), method.parameters()
    optimizer, optimizer_name = make_optimizer(groups, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = make_grad_scaler(precision)
    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: they draw the same global batch
    instance_order = ShuffledOrder(cache.instance.num_images, generator)
    class_order = ShuffledOrder(cache.classes.num_images, generator) if cache.classes is not None else None
    alphas = schedule_alphas(model.schedule).to(device)
    embed_prompts = prompt_embedder(model, cache, [instance_prompt, subject.class_prompt], trains_text, device)
    text_modules = {k: m for k, m in method.trained_modules().items() if k != "unet"}
    denoiser = dist.wrap(model.unet, text_modules, find_unused=cfg.train_text_encoder)  # what training_step calls
    prompts_to_watch = [method.prompt(p) for p in cfg.validation_prompts or subject.validation_prompts or (
        [t.format(f"{subject.token} {subject.class_noun}") for t in VALIDATION_TEMPLATES] + [subject.class_prompt])]

    # -- resume: every piece of state a step reads comes back from the checkpoint
    step, skipped, history = 0, 0, []
    if cfg.resume:
        path, state = load_latest_checkpoint(run)
        if state is not None:
            method.load_state_dict(state["trained"] if "trained" in state else state["lora"], where=str(path))
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            set_rng_states(state["rng"], generator)
            instance_order.load_state_dict(state["instance_order"])
            if class_order is not None:
                class_order.load_state_dict(state["class_order"])
            step, skipped, history = state["step"], state["skipped"], state["history"]
            print(f"resuming from {path} (step {step})")

    def checkpoint():
        if not dist.is_main:
            return
        try:
            if method.checkpoint_result:
                method.save(run / "checkpoints" / f"step-{step:06d}{Path(method.output).suffix}", step)
            save_checkpoint(run, step, {
                "step": step, "skipped": skipped, "history": history, "optimizer_name": optimizer_name,
                "method": cfg.method, "trained": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(generator),
                "instance_order": instance_order.state_dict(),
                "class_order": class_order.state_dict() if class_order is not None else None,
            }, keep=cfg.keep_checkpoints)
        except OSError as e:
            raise TrainingError(f"could not write the step-{step} checkpoint ({e.strerror or e}); earlier checkpoints "
                                f"are intact: free disk space, then `python train.py --resume {run}`") from None

    def write_logs():
        if dist.is_main:
            write_loss_csv(run / "loss.csv", history)
            save_png(run / "loss.png", draw_loss_curve(history))

    def validation(step):
        if dist.is_main:
            validate(model, prompts_to_watch, cfg.validation_seeds, cfg, step, run, device)
        dist.barrier()

    # -- the loop
    base_lrs = [g["lr"] for g in groups]
    print(f"training {method.summary()} for {cfg.steps} steps on {device} ({precision.name}, {optimizer_name}, "
          f"batch {cfg.batch_size}x{cfg.grad_accum}" + (f" x {dist.world_size} processes" if dist.enabled else "")
          + f", {'prior on' if plan else 'no prior'})")
    if step == 0 and cfg.validate_every:
        validation(0)
    with StopRequest() as stop:
        stopping = dist.any(stop.requested)  # Ctrl-C on any rank stops every rank after the same step
        while step < cfg.steps and not stopping:
            start = time.perf_counter()
            set_lr(optimizer, step, base_lrs, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
            parts = []
            for micro in range(cfg.grad_accum):
                batch = draw_batch(cache, instance_order, class_order, cfg.batch_size * dist.world_size, generator,
                                   scaling_factor=model.vae.config.scaling_factor,
                                   num_timesteps=model.schedule.num_train_timesteps, noise_offset=cfg.noise_offset,
                                   sdxl=model.is_sdxl, device=device)
                with dist.accumulating(denoiser, last_micro_step=micro == cfg.grad_accum - 1):
                    parts.append(training_step(denoiser, dist.shard(batch), embed_prompts, alphas,
                                               prediction_type=model.schedule.prediction_type,
                                               prior_weight=cfg.prior_weight, snr_gamma=cfg.snr_gamma,
                                               autocast_dtype=precision.autocast_dtype, scaler=scaler,
                                               accumulation=cfg.grad_accum))
            lr = optimizer.param_groups[0]["lr"]
            grad_norm, applied = apply_gradients(optimizer, params, scaler, cfg.max_grad_norm)
            step += 1
            skipped += not applied
            losses = torch.tensor([[p.loss.item(), p.instance.item(), p.prior.item()] for p in parts],
                                  dtype=torch.float64, device=device).mean(dim=0)
            loss, instance_loss, prior_loss = dist.mean(losses).tolist()  # the global batch's losses
            history.append({
                "step": step, "lr": lr, "grad_norm": grad_norm, "skipped": int(not applied), "loss": loss,
                "instance_loss": instance_loss, "prior_loss": prior_loss, "seconds": time.perf_counter() - start,
            })
            if not applied:
                print(f"step {step}: gradient is inf/NaN, update skipped ({skipped} so far)")
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                print(log_line(history[-1], cfg.steps, skipped))
                write_logs()
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                validation(step)
            stopping = dist.any(stop.requested)
            if (cfg.save_every and step % cfg.save_every == 0) or stopping or step == cfg.steps:
                checkpoint()
    write_logs()
    if step < cfg.steps:
        print(f"stopped at step {step}; continue with: python train.py --resume {run}")
        return run
    if dist.is_main:
        result = method.save(run / method.output, step)
        print(f"done: {result} ({skipped} step(s) skipped for inf/NaN gradients)\n"
              f"try it: python sample.py {method.sample_flag} {result} --prompt \"{prompts_to_watch[0]}\"")
    return run
