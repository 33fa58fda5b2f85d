"""Pretrain the bundled tiny SDXL on the toy world, so that it draws what its prompt says.

SDXL learned from a few hundred million captioned photos; the tiny model bundled in weights/tiny-sdxl
learns the toy world (toyworld.py): 64x64 pictures of persons, dogs, cups, cars and backpacks, in
six places and three styles, with captions from a 49-word vocabulary. The recipe is latent
diffusion's (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"),
in two stages, both with minidream's own modules:

  1. the autoencoder (sec. 3.1): image -> latent -> image, trained on a reconstruction loss plus a
     small KL term; then its latents are normalised to zero mean and unit variance (sec. 4.3.2 of
     the paper rescales them for the same reason), folded exactly into its two 1x1 convolutions;
  2. the UNet (sec. 3.3): the denoising loss DreamBooth fine-tunes with (step.training_step, every
     row an "instance" row), on VAE latents computed once for all pictures. SDXL's text encoders
     were pretrained CLIP models, frozen while its UNet trained; no pretrained CLIP knows the toy
     words, so here the two small text encoders learn together with the UNet (with
     --train-text-encoders False they stay random and frozen, their outputs cached per caption).

It starts from exactly the random model `python -m minidream.toy.tiny` writes with the same seed and
replaces its UNet and VAE weights, then writes the folder with tiny.write_tiny_sdxl, so the bundled
weights have one source: this command.

    python -m minidream.toy.pretrain                          # weights/tiny-sdxl (see README for the time)
    python -m minidream.toy.pretrain --scale 0.01 --out /tmp/tiny-smoke     # a smoke run in seconds
    python -m minidream.toy.pretrain --start-from weights/tiny-sdxl --seed 1 --unet-steps 4000   # train on

--start-from continues from a written folder (its VAE is kept, stage 1 skipped): compute adds up over
several runs, each appended to the folder's pretraining.json with its steps and time. With --save-every
the folder is rewritten every that many UNet steps, so a stopped run loses little.

Every random number comes from generators seeded with --seed, so a run gives the same weights
again for the same torch version and --threads (CPU kernels sum in thread-dependent order).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from minidream.toy import tiny, toyworld
from minidream.files import write_json
from minidream.formats.models import load_model
from minidream.optim import lr_at
from minidream.schedule import ScheduleConfig, alphas_cumprod as alphas_cumprod_of
from minidream.step import Batch, apply_gradients, training_step
from minidream.text import encode_text, sdxl_time_ids


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run. --scale multiplies the step and picture counts."""

    out: str = "weights/tiny-sdxl"  # where the diffusers folder is written
    seed: int = 0  # seeds the initial weights, the pictures, batches, noise and timesteps
    threads: int = 2  # torch CPU threads (the bits of the result depend on it)
    pictures: int = 30_000  # toy-world pictures rendered once, each with one random caption
    # stage 1: the VAE
    vae_steps: int = 4000  # optimizer steps
    vae_batch: int = 32  # crops per step
    vae_crop: int = 32  # side of the random crops it trains on (px): 4x cheaper than whole pictures
    vae_lr: float = 2e-3  # peak learning rate (linear warmup, cosine decay)
    kl_weight: float = 1e-4  # weight of the KL term against the mean absolute reconstruction error
    # stage 2: the UNet
    unet_steps: int = 2500  # optimizer steps
    unet_batch: int = 64  # latents per step
    unet_lr: float = 1e-3  # peak learning rate (linear warmup, cosine decay)
    warmup_steps: int = 100  # linear warmup of both stages
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023): faster convergence
    caption_dropout: float = 0.1  # share of rows trained with the zero "unconditional" embedding
    ema_decay: float = 0.995  # the written weights are an exponential moving average of the trained ones
    train_text_encoders: bool = True  # train the toy "CLIP" with the UNet (else frozen random, cached)
    log_every: int = 100  # steps between log lines
    start_from: str = ""  # a folder this command wrote: continue training its UNet and text encoders
    save_every: int = 0  # rewrite `out` every this many UNet steps (0: only at the end)

    def scaled(self, scale: float) -> "PretrainConfig":
        counts = ("pictures", "vae_steps", "unet_steps", "warmup_steps", "log_every", "save_every")
        return PretrainConfig(**{**asdict(self), **{k: max(int(getattr(self, k) > 0), round(getattr(self, k) * scale))
                                                    for k in counts}})


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f}s] {message}", flush=True)


# ----------------------------------------------------------------------------- stage 1: the VAE

def to_unit_range(pictures: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged (Kingma & Welling 2014,
    "Auto-Encoding Variational Bayes", appendix B: -KL = 1/2 sum(1 + log s^2 - m^2 - s^2))."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


def sample_latent(mean, logvar, generator=None):
    """z = mean + exp(logvar / 2) * eps ~ N(mean, exp(logvar)) (reparameterisation, Kingma & Welling 2014).

    eps is drawn on the generator's device as diffusers draws it, so a seed gives the same latent in both."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def train_vae(vae, pictures: np.ndarray, cfg: PretrainConfig, generator: torch.Generator, start: float):
    """Mean absolute reconstruction error + kl_weight * KL on random crops of random pictures.

    The VAE is convolutional, so crops teach it the same local job as whole pictures for a
    quarter of the compute (the latent-diffusion autoencoders were trained on crops too).
    """
    vae.requires_grad_(True).train()
    with torch.no_grad():  # start with a narrow posterior (std e^-3): fed unit-variance noise, the
        vae.quant_conv.bias[vae.config.latent_channels:] -= 6  # decoder first learns to ignore its input
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    side = pictures.shape[1]
    for step in range(cfg.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.vae_lr, "cosine", cfg.warmup_steps, cfg.vae_steps)
        rows = torch.randint(len(pictures), (cfg.vae_batch,), generator=generator).numpy()
        top, left = torch.randint(side - cfg.vae_crop + 1, (2,), generator=generator).tolist()
        x = to_unit_range(pictures[rows, top:top + cfg.vae_crop, left:left + cfg.vae_crop])
        mean, logvar = vae.encode(x)
        reconstruction = vae.decode(sample_latent(mean, logvar, generator))
        error = (reconstruction - x).abs().mean()
        kl = kl_to_standard_normal(mean, logvar)
        loss = error + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step + 1:>5}/{cfg.vae_steps} | L1 {error.item():.4f} | KL {kl.item():.2f}", start)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pictures(vae, pictures: np.ndarray, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent Gaussian for every picture, each (N, 4, h, w) fp32."""
    means, stds = [], []
    for i in range(0, len(pictures), batch):
        mean, logvar = vae.encode(to_unit_range(pictures[i:i + batch]))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def normalise_latents(vae, mean: torch.Tensor, std: torch.Tensor):
    """Make latent * scaling_factor zero-mean and unit-variance per channel; returns the new (mean, std).

    The UNet's noise schedule assumes data of unit variance. Latent diffusion divides latents by
    their standard deviation through `scaling_factor`; SDXL's is fixed at 0.13025 (it is in the
    config), so instead the latent itself is moved: z' = (z - mu) * c, folded exactly into the 1x1
    quant_conv (mean rows times c, minus mu c; log-variance plus 2 log c) and post_quant_conv
    (which then undoes it: z = z' / c + mu). Encoder and decoder compute the same images as before.
    """
    mu = mean.mean(dim=(0, 2, 3))  # (4,)
    c = 1 / (mean.std(dim=(0, 2, 3)) * vae.config.scaling_factor)  # (4,)
    n = vae.config.latent_channels
    q, p = vae.quant_conv, vae.post_quant_conv  # weights (2n, 2n, 1, 1) and (n, n, 1, 1)
    q.weight[:n] *= c[:, None, None, None]
    q.bias[:n] = (q.bias[:n] - mu) * c
    q.bias[n:] += 2 * torch.log(c)
    p.bias += p.weight[:, :, 0, 0] @ mu
    p.weight /= c[None, :, None, None]
    shape = (1, n, 1, 1)
    return (mean - mu.view(shape)) * c.view(shape), std * c.view(shape)


# ----------------------------------------------------------------------------- stage 2: the UNet

@torch.no_grad()
def encode_captions(text, captions: list[str], batch: int = 256):
    """Distinct captions -> (index (N,), context table (K, 77, D), pooled table (K, Dp)), fp32."""
    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    contexts, pooleds = [], []
    for i in range(0, len(distinct), batch):
        context, pooled = encode_text(text, distinct[i:i + batch])
        contexts.append(context.float())
        pooleds.append(pooled.float())
    return torch.tensor([row[c] for c in captions]), torch.cat(contexts), torch.cat(pooleds)


def train_unet(unet, text, latents, captions: list[str], schedule: ScheduleConfig, scaling_factor: float,
               cfg: PretrainConfig, generator: torch.Generator, start: float, callback=None):
    """The denoising loss on cached latents, UNet and text encoders together; returns the EMA
    copies of their weights {"unet": ..., "text_encoder": ..., "text_encoder_2": ...}.

    latents: (mean, std) of every picture's latent (normalised); captions: one per picture. A
    share caption_dropout of rows sees the zero embedding SDXL uses as the unconditional prompt,
    so classifier-free guidance (Ho & Salimans 2022) works at sampling time.
    """
    mean, std = latents
    alphas_cumprod = alphas_cumprod_of(schedule)
    modules = {"unet": unet, "text_encoder": text.text_encoder, "text_encoder_2": text.text_encoder_2}
    if not cfg.train_text_encoders:
        modules = {"unet": unet}
        index, contexts, pooleds = encode_captions(text, captions)
    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: apply_gradients' scaler does nothing
    ema = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    side = mean.shape[-1] * 2 ** (len(tiny.VAE["block_out_channels"]) - 1)
    time_ids = sdxl_time_ids((side, side), (0, 0), (side, side)).expand(cfg.unet_batch, 6)  # (B, 6)
    for step in range(cfg.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.unet_lr, "cosine", cfg.warmup_steps, cfg.unet_steps)
        rows = torch.randint(len(mean), (cfg.unet_batch,), generator=generator)
        x0 = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scaling_factor
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(schedule.num_train_timesteps, (cfg.unet_batch,), generator=generator)
        keep = (torch.rand(cfg.unet_batch, generator=generator) >= cfg.caption_dropout).float()

        def embed_prompts():  # (B, 77, D) and (B, Dp); dropped rows all zeros
            if cfg.train_text_encoders:
                context, pooled = encode_text(text, [captions[i] for i in rows])
            else:
                context, pooled = contexts[index[rows]], pooleds[index[rows]]
            return context * keep[:, None, None], pooled * keep[:, None]

        batch = Batch(x0, noise, t, time_ids, prompt_index=torch.arange(cfg.unet_batch), num_instance=cfg.unet_batch)
        losses = training_step(unet, batch, embed_prompts, alphas_cumprod, snr_gamma=cfg.snr_gamma)
        grad_norm, _ = apply_gradients(optimizer, params, scaler, max_grad_norm=1.0)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short memory while the weights move fast
        with torch.no_grad():
            for name, m in modules.items():
                for k, v in m.state_dict().items():
                    if v.is_floating_point():
                        ema[name][k].lerp_(v, 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step + 1:>5}/{cfg.unet_steps} | loss {losses.loss.item():.4f} | "
                f"grad norm {grad_norm:.2f}", start)
        if callback is not None:
            callback(step + 1, ema, modules)
    for m in modules.values():
        m.eval().requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------- the whole run

RECORD = "pretraining.json"  # in the written folder: every run that trained these weights


def past_runs(folder) -> list[dict]:
    """The runs recorded in `folder`/pretraining.json ([] for a folder without one)."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def write_folder(cfg: PretrainConfig, text, weights: dict, vae, runs: list[dict]) -> Path:
    """Write the diffusers folder (to a sibling temp folder, then swapped in) with its run record."""
    out = Path(cfg.out)
    staging = out.with_name(out.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    tiny.write_tiny_sdxl(staging, cfg.seed, state_dicts={
        "text_encoder": text.text_encoder.state_dict(), "text_encoder_2": text.text_encoder_2.state_dict(),
        **weights, "vae": vae.state_dict()})
    unet_steps = sum(r["unet_steps"] for r in runs)
    samples = sum(r["unet_steps"] * r["unet_batch"] for r in runs)
    write_json(staging / RECORD, {"total": {"unet_steps": unet_steps, "unet_samples": samples,
                                            "seconds": round(sum(r["seconds"] for r in runs))}, "runs": runs})
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def pretrain(cfg: PretrainConfig) -> Path:
    """Both stages (or stage 2 only, from --start-from), then write the folder; returns it."""
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    if cfg.start_from:
        model, runs = load_model(cfg.start_from), past_runs(cfg.start_from)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the random model, loaded the way every model is
            model, runs = load_model(tiny.write_tiny_sdxl(Path(tmp) / "random", cfg.seed, dtype=torch.float32)), []
    generator = torch.Generator().manual_seed(cfg.seed)
    pictures, _, captions = toyworld.batch(cfg.pictures, seed=(cfg.seed, 1))
    log(f"rendered {len(pictures)} toy-world pictures ({len(set(captions))} distinct captions)", start)

    if cfg.start_from:
        vae = model.vae
        mean, std = encode_pictures(vae, pictures)
    else:
        vae = train_vae(model.vae, pictures, cfg, generator, start)
        mean, std = normalise_latents(vae, *encode_pictures(vae, pictures))
    log(f"encoded the pictures: latents {tuple(mean.shape[1:])}, posterior std {std.mean():.4f}", start)
    del pictures
    this_run = {"seed": cfg.seed, "threads": cfg.threads, "unet_steps": 0, "unet_batch": cfg.unet_batch,
                "unet_lr": cfg.unet_lr, "vae_steps": 0 if cfg.start_from else cfg.vae_steps, "seconds": 0}

    def save(steps_done: int, weights: dict) -> Path:
        this_run.update(unet_steps=steps_done, seconds=round(time.perf_counter() - start))
        return write_folder(cfg, model.text, weights, vae, runs + [this_run])

    def save_now_and_then(steps_done: int, ema: dict, modules) -> None:
        if cfg.save_every and steps_done % cfg.save_every == 0 and steps_done < cfg.unet_steps:
            save(steps_done, ema)
            log(f"saved {cfg.out} after {steps_done} steps", start)

    weights = train_unet(model.unet, model.text, (mean, std), captions, model.schedule, vae.config.scaling_factor,
                         cfg, generator, start, callback=save_now_and_then)
    folder = save(cfg.unet_steps, weights)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    log(f"wrote {folder} ({size / 1e6:.1f} MB)", start)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidream.toy.pretrain", description=__doc__.split("\n\n")[0])
    defaults = PretrainConfig()
    for f in fields(PretrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), help=f"(default: {getattr(defaults, f.name)})")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply step and picture counts (smoke runs)")
    args = vars(parser.parse_args(argv))
    scale = args.pop("scale")
    pretrain(PretrainConfig(**args).scaled(scale))


if __name__ == "__main__":
    main()
