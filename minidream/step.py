"""One DreamBooth training step, apart from data loading, logging and files.

    x_t = add_noise(x0, noise, t)                                   [schedule.py]
    pred = UNet(x_t, t, context, pooled, time_ids)                  under torch.autocast
    loss = MSE(instance rows) + prior_weight * MSE(class rows)      Ruiz et al. 2022, eq. 2
    (loss * scale / accumulation).backward(); apply_gradients: unscale, clip, skip inf/NaN, step

Instance and class rows go through the UNet as ONE batch, each row with its own noise and timestep
(the paper's eps, t and eps', t'). training_step never reads a tensor's value, so the T4 memory
planner can run the very same step on fake tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minidream.schedule import add_noise, snr, training_target


@dataclass
class Batch:
    """One micro-batch. Rows [0, num_instance) are subject images, the rest class images."""

    latents: torch.Tensor  # (N, 4, h, w) clean latents x0, already times the VAE scaling factor
    noise: torch.Tensor  # (N, 4, h, w) eps (with the noise offset, if any, already added)
    timesteps: torch.Tensor  # (N,) int64 in [0, T)
    time_ids: torch.Tensor | None  # (N, 6) SDXL size/crop conditioning; None for SD 1.x / 2.x
    prompt_index: torch.Tensor  # (N,) int64: row i's prompt (0 instance, 1 class, then captions)
    num_instance: int  # how many rows are instance rows
    pixel_weights: torch.Tensor | None = None  # (num_instance, 1, h, w) from masks; None: all 1


@dataclass
class StepLosses:
    """Detached 0-d tensors (call .item() to log them)."""

    loss: torch.Tensor  # instance + prior_weight * prior (before any loss scaling)
    instance: torch.Tensor
    prior: torch.Tensor  # 0 when the batch has no class rows


# ----------------------------------------------------------------------------- the loss

def min_snr_weights(timesteps, alphas_cumprod, gamma: float, prediction_type: str = "epsilon"):
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", sec. 3.4): w_t = min(SNR(t), gamma) / SNR(t), so low-noise timesteps stop
    dominating. v-prediction adds 1, as diffusers' script (paper: min(SNR, gamma) / (SNR + 1))."""
    s = snr(timesteps, alphas_cumprod)
    weight = torch.clamp(s, max=gamma) / s
    return weight + 1 if prediction_type == "v_prediction" else weight


def dreambooth_loss(pred, target, num_instance: int, prior_weight=1.0, instance_weights=None,
                    pixel_weights=None):
    """(loss, instance_loss, prior_loss); the batch's first `num_instance` rows are instance rows.
    Ruiz et al. 2022 ("DreamBooth"), eq. 2: the denoising MSE on the subject's images plus lambda =
    prior_weight times the MSE on class images the base model generated itself (prior preservation:
    no "language drift"). instance_weights (min-SNR) weight instance rows only, as in diffusers.
    pixel_weights (n, 1, h, w), from the photos' masks, make an instance row's MSE a weighted mean
    over latent pixels, sum(w * err) / sum(w): the loss stays on the subject, and a photo in which
    it is small counts as much as one it fills (kohya's masked loss divides by h * w instead)."""
    squared = (pred.float() - target.float()) ** 2  # (N, C, h, w)
    per_row = squared.mean(dim=tuple(range(1, pred.dim())))  # (N,)
    if pixel_weights is not None:
        w = pixel_weights.float()  # (n, 1, h, w)
        weighted_sum = (squared[:num_instance] * w).sum(dim=(1, 2, 3))
        masked = weighted_sum / (w.sum(dim=(1, 2, 3)) * pred.shape[1])  # (n,) the channel mean too
        per_row = torch.cat([masked, per_row[num_instance:]])
    weights = 1.0 if instance_weights is None else instance_weights
    instance = (per_row[:num_instance] * weights).mean()
    has_prior = per_row.shape[0] > num_instance
    prior = per_row[num_instance:].mean() if has_prior else torch.zeros_like(instance)
    return instance + prior_weight * prior, instance, prior


# ----------------------------------------------------------------------------- forward + backward

def training_step(unet: torch.nn.Module, batch: Batch, embed_prompts, alphas_cumprod: torch.Tensor,
                  *, prediction_type: str = "epsilon", prior_weight: float = 1.0,
                  snr_gamma: float | None = None, autocast_dtype: torch.dtype | None = None,
                  scaler: torch.amp.GradScaler | None = None, accumulation: int = 1) -> StepLosses:
    """Forward and backward of one micro-batch; gradients of loss / `accumulation` add up in .grad.
    embed_prompts() gives (context (P, L, D), pooled (P, Dp) or None): cached, or encoded now under
    autocast when the text encoders train. autocast_dtype None runs in the weights' own dtype."""
    x0, noise, t = batch.latents, batch.noise, batch.timesteps
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    target = training_target(x0, noise, t, alphas_cumprod, prediction_type)
    dtype = autocast_dtype or torch.float32
    with torch.autocast(x0.device.type, dtype=dtype, enabled=autocast_dtype is not None):
        context, pooled = embed_prompts()
        context = context[batch.prompt_index]  # (N, L, D)
        pooled = None if pooled is None else pooled[batch.prompt_index]  # (N, Dp)
        pred = unet(x_t, t, context, pooled, batch.time_ids)
    n = batch.num_instance
    w = min_snr_weights(t[:n], alphas_cumprod, snr_gamma, prediction_type) if snr_gamma else None
    loss, instance, prior = dreambooth_loss(pred, target, n, prior_weight, w, batch.pixel_weights)
    (loss / accumulation if scaler is None else scaler.scale(loss / accumulation)).backward()
    return StepLosses(loss.detach(), instance.detach(), prior.detach())


# ----------------------------------------------------------------------------- optimizer step

def apply_gradients(optimizer: torch.optim.Optimizer, params: list, scaler: torch.amp.GradScaler,
                    max_grad_norm: float | None) -> tuple[float, bool]:
    """Unscale, clip, step (unless a gradient is inf/NaN), update the loss scale, zero the grads.
    Returns (gradient norm before clipping, applied). A non-finite gradient (fp16 overflow, or a
    real divergence) is never applied: parameters and optimizer moments stay as they were."""
    scaler.unscale_(optimizer)  # grads /= scale, and record inf/NaN (no-op for a disabled scaler)
    # the total 2-norm: inf/NaN if any gradient is
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    applied = bool(torch.isfinite(norm))
    if applied:
        scaler.step(optimizer)  # optimizer.step(); an enabled scaler checks once more for inf
    scaler.update()  # fp16: halve the scale after an overflow, double it after 2000 clean steps
    optimizer.zero_grad(set_to_none=True)
    return float(norm), applied
