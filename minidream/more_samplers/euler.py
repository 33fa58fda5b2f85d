"""Euler: the probability-flow ODE integrated in sigma space, as diffusers' EulerDiscreteScheduler does."""

import torch

from minidream.schedule import ScheduleConfig, alphas_cumprod, inference_timesteps


def euler(model, x, cfg: ScheduleConfig, steps: int, *, callback=None):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma (Karras et al. 2022,
    "Elucidating the Design Space...", Alg. 2 with S_churn = 0 and no second-order correction).

    x lives in sigma space, x = x_t / sqrt(alpha_bar_t) with sigma_t = sqrt((1 - a) / a): the UNet is given
    x / sqrt(sigma^2 + 1) = x_t, the input it was trained on. x comes in as unit noise and is scaled to
    sigma space first (init_noise_sigma)."""
    if cfg.timestep_spacing == "linspace":
        raise ValueError("euler supports leading or trailing spacing (linspace gives fractional timesteps)")
    x = x * init_noise_sigma(cfg, steps)
    ac = _euler_alphas_cumprod(cfg).to(x.device)
    ts = inference_timesteps(cfg, steps)
    sigmas = [((1 - ac[t]) / ac[t]) ** 0.5 for t in ts] + [torch.zeros((), device=x.device)]
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = model(x / (sigma**2 + 1) ** 0.5, t)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # as diffusers: a half model's step runs in float32
        if cfg.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:  # v_prediction, rewritten for sigma space
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        x = (x + (x - x0) / sigma * (sigma_next - sigma)).to(out.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def _euler_alphas_cumprod(cfg):
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:  # diffusers: alpha_bar = 0 would make sigma_max infinite
        ac[-1] = 2**-24
    return ac


def init_noise_sigma(cfg: ScheduleConfig, steps: int) -> float:
    """Scale from unit Gaussian noise to Euler's x_T: sqrt(sigma_max^2 + 1) (x_t / sqrt(alpha_bar) at t_max).
    diffusers quirk kept: sigma_max alone for trailing (and linspace) spacing."""
    ac = _euler_alphas_cumprod(cfg)
    t_max = inference_timesteps(cfg, steps)[0]
    sigma_max = ((1 - ac[t_max]) / ac[t_max]) ** 0.5
    return float(sigma_max if cfg.timestep_spacing != "leading" else (sigma_max**2 + 1) ** 0.5)
