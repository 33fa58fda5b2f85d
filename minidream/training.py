"""DreamBooth LoRA training for SDXL (Ruiz et al. 2022 + Hu et al. 2021), top to bottom.

    settings -> subject + class images -> model -> cache latents and prompts -> LoRA + optimizer
    -> loop: lr, micro-batches (training_step), apply_gradients, log, validate, checkpoint
    -> final LoRA file

The pieces live in their own files: the loss and one step (step.py), the optimizer, lr schedule
and mixed precision (optim.py), the cached latents and batches (latent_cache.py), class images
(prior.py), the run folder and checkpoints (runs.py), the settings (train_config.py). train.py is the
command line around train().
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minidream.data import load_images, load_subject
from minidream.files import save_png, write_json
from minidream.latent_cache import ShuffledOrder, build_cache, draw_batch, load_cache, offload_encoders, save_cache
from minidream.lora import (TEXT_ATTENTION, UNET_ATTENTION, inject_lora, lora_parameters, lora_state_dict,
                            mark_only_lora_trainable)
from minidream.lora_files import save_lora
from minidream.model import default_model_path, load_model
from minidream.optim import make_grad_scaler, make_optimizer, resolve_precision, set_lr
from minidream.prior import fill_class_folder, plan_class_images
from minidream.runs import (LORA_FILE, StopRequest, draw_loss_curve, labelled_grid, load_latest_checkpoint,
                            new_run_folder, rng_states, save_checkpoint, set_rng_states, write_loss_csv)
from minidream.schedule import alphas_cumprod as schedule_alphas
from minidream.step import apply_gradients, training_step
from minidream.text import encode_text
from minidream.train_config import (VALIDATION_TEMPLATES, TrainConfig, TrainingError, check_config, fill_defaults,
                                    model_image_size, resumed_config, slug)


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


def add_lora(model, cfg: TrainConfig) -> list[dict]:
    """Fresh fp32 adapters on the frozen UNet's attention (and on both text encoders' attention with
    --train-text-encoder); only they require grad. Returns the optimizer's parameter groups."""
    unet = model.unet
    inject_lora(unet, UNET_ATTENTION, rank=cfg.rank, alpha=cfg.alpha)
    unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    mark_only_lora_trainable(unet)
    unet.train()
    groups = [{"params": lora_parameters(unet), "lr": cfg.lr}]
    for encoder in (model.text.text_encoder, model.text.text_encoder_2) if cfg.train_text_encoder else ():
        if encoder is None:
            continue
        inject_lora(encoder, TEXT_ATTENTION, rank=cfg.rank, alpha=cfg.alpha)
        mark_only_lora_trainable(encoder)
        encoder.train()  # CLIP's dropout is 0; transformers only checkpoints in train mode
        if cfg.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
            if hasattr(encoder, "activation_checkpointing_enable"):
                encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups.append({"params": lora_parameters(encoder), "lr": cfg.text_encoder_lr})
    return groups


def prompt_embedder(model, cache, subject, train_text_encoder: bool, device):
    """The embed_prompts() of training_step: the cached table, or the (LoRA) text encoders run anew."""
    if train_text_encoder:
        prompts = [subject.instance_prompt, subject.class_prompt]
        return lambda: encode_text(model.text, prompts)  # with gradients (encode_prompt is no_grad)
    context, pooled = cache.context.to(device), None if cache.pooled is None else cache.pooled.to(device)
    return lambda: (context, pooled)


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
    groups = add_lora(model, cfg)
    models = adapted_models(model, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer, optimizer_name = make_optimizer(groups, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = make_grad_scaler(precision)
    generator = torch.Generator().manual_seed(cfg.seed)
    instance_order = ShuffledOrder(cache.instance.num_images, generator)
    class_order = ShuffledOrder(cache.classes.num_images, generator) if cache.classes is not None else None
    alphas = schedule_alphas(model.schedule).to(device)
    embed_prompts = prompt_embedder(model, cache, subject, cfg.train_text_encoder, device)
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
