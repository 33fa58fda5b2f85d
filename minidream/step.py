"""One DreamBooth training step, apart from data loading, logging and files.

    batch (cached latents x0, noise, timesteps, size/crop ids, which prompt each row reads)
      x_t = add_noise(x0, noise, t)                                       [schedule.py]
      pred = UNet(x_t, t, context, pooled, time_ids)      under torch.autocast
      loss = MSE(instance rows) + prior_weight * MSE(class rows)           Ruiz et al. 2022, eq. 2
      (loss * loss_scale / accumulation).backward()                        the trained parameters only
    apply_gradients: unscale, clip, skip if inf/NaN, optimizer step, update the scale

`training_step` is a plain function of modules and tensors, so the T4 memory planner can run the
very same step on fake tensors (shapes only). It never reads a tensor's value (no .item()): the
losses come back as 0-d tensors for the caller to log.

Instance and class rows go through the UNet as ONE batch: one forward and one backward compute
both terms of eq. 2, each row with its own noise and timestep (the paper's eps, t and eps', t').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from minidream.schedule import add_noise, snr, training_target


@dataclass
class Batch:
    """The tensors of one micro-batch. Rows [0, num_instance) are subject images, the rest class images."""

    latents: torch.Tensor  # (N, 4, h, w) clean latents x0, already times the VAE scaling factor
    noise: torch.Tensor  # (N, 4, h, w) eps (with the noise offset, if any, already added)
    timesteps: torch.Tensor  # (N,) int64 in [0, T)
    time_ids: torch.Tensor | None  # (N, 6) SDXL size/crop conditioning; None for SD 1.x / 2.x
    prompt_index: torch.Tensor  # (N,) int64: row i reads prompt prompt_index[i] (0 instance, 1 class)
    num_instance: int  # how many rows are instance rows


@dataclass
class StepLosses:
    """Detached 0-d tensors (call .item() to log them)."""

    loss: torch.Tensor  # instance + prior_weight * prior (before any loss scaling)
    instance: torch.Tensor
    prior: torch.Tensor  # 0 when the batch has no class rows


# ----------------------------------------------------------------------------- the loss

def min_snr_weights(timesteps, alphas_cumprod, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", sec. 3.4): w_t = min(SNR(t), gamma) / SNR(t) for an eps-predicting model.

    Low-noise timesteps (huge SNR) get small weights, so they stop dominating the gradient. This is
    the weighting of diffusers' SDXL DreamBooth LoRA script, including its v-prediction variant
    (the same weight + 1; the paper's v-form would be min(SNR, gamma) / (SNR + 1)). With prior
    preservation it weights the instance rows only, with their own timesteps, as that script does.
    """
    s = snr(timesteps, alphas_cumprod)
    weight = torch.clamp(s, max=gamma) / s
    return weight + 1 if prediction_type == "v_prediction" else weight


def dreambooth_loss(pred, target, num_instance: int, prior_weight: float = 1.0, instance_weights=None):
    """(loss, instance_loss, prior_loss) for a batch whose first `num_instance` rows are instance rows.

    Ruiz et al. 2022 ("DreamBooth"), eq. 2: the usual denoising loss on the subject's images plus
    lambda times the same loss on class images the base model generated itself (prior preservation:
    the class keeps looking like the class, no "language drift"). lambda = prior_weight (paper: 1).
    Each term is the mean squared error over its rows (as F.mse_loss(..., reduction="mean")).
    instance_weights: optional (num_instance,) per-row weights (min-SNR), applied to the per-row
    MSE of the instance term only, as diffusers' SDXL DreamBooth LoRA script does.
    """
    per_row = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))  # (N,)
    instance_rows = per_row[:num_instance]
    if instance_weights is not None:
        instance_rows = instance_rows * instance_weights
    instance = instance_rows.mean()
    prior = per_row[num_instance:].mean() if per_row.shape[0] > num_instance else torch.zeros_like(instance)
    return instance + prior_weight * prior, instance, prior


# ----------------------------------------------------------------------------- forward + backward

PromptEmbedder = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def training_step(unet: torch.nn.Module, batch: Batch, embed_prompts: PromptEmbedder, alphas_cumprod: torch.Tensor,
                  *, prediction_type: str = "epsilon", prior_weight: float = 1.0, snr_gamma: float | None = None,
                  autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                  accumulation: int = 1) -> StepLosses:
    """Forward and backward of one micro-batch; gradients accumulate in the trained parameters' .grad
    (LoRA adapters, all UNet weights, or a new word's embedding: see methods.py).

    embed_prompts() returns the prompt table (context (P, L, D), pooled (P, Dp) or None): the cached
    embeddings, or the text encoders run now when gradients must reach them. It is called
    under autocast, so trained text encoders run in the autocast dtype too.
    autocast_dtype: fp16/bf16 run matmuls and convs in that dtype (weights stay as they are, LoRA
    parameters fp32); None runs in the weights' own dtype. scaler: fp16 loss scaling (see optim.py).
    accumulation: the loss is divided by it, so the summed gradients of that many micro-batches
    equal the gradient of their mean loss.
    """
    x0, noise, t = batch.latents, batch.noise, batch.timesteps
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    target = training_target(x0, noise, t, alphas_cumprod, prediction_type)
    device_type = x0.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        context, pooled = embed_prompts()
        context = context[batch.prompt_index]  # (N, L, D)
        pooled = None if pooled is None else pooled[batch.prompt_index]  # (N, Dp)
        pred = unet(x_t, t, context, pooled, batch.time_ids)
    weights = None
    if snr_gamma:
        weights = min_snr_weights(t[: batch.num_instance], alphas_cumprod, snr_gamma, prediction_type)
    loss, instance, prior = dreambooth_loss(pred, target, batch.num_instance, prior_weight, weights)
    to_backprop = loss / accumulation
    if scaler is not None:
        to_backprop = scaler.scale(to_backprop)
    to_backprop.backward()
    return StepLosses(loss.detach(), instance.detach(), prior.detach())


# ----------------------------------------------------------------------------- optimizer step

def apply_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], scaler: torch.amp.GradScaler,
                    max_grad_norm: float | None) -> tuple[float, bool]:
    """Unscale, clip, step (unless a gradient is inf/NaN), update the loss scale, zero the grads.

    Returns (gradient norm before clipping, applied). A non-finite gradient (fp16 overflow, or a
    real divergence in bf16/fp32) is never applied: the parameters and the optimizer's moments stay
    as they were, and with fp16 the scale is halved for the next step.
    """
    scaler.unscale_(optimizer)  # grads /= scale, and record inf/NaN (no-op for a disabled scaler)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))  # total 2-norm, inf/NaN if any is
    applied = bool(torch.isfinite(norm))
    if applied:
        scaler.step(optimizer)  # optimizer.step(); an enabled scaler checks once more for inf
    scaler.update()  # fp16: halve the scale after an overflow, double it after 2000 clean steps
    optimizer.zero_grad(set_to_none=True)
    return float(norm), applied
