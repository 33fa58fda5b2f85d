"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler runs it."""

import numpy as np
import torch

from minidream.schedule import ScheduleConfig, alphas_cumprod, inference_timesteps


def dpmpp_2m(model, x, cfg: ScheduleConfig, steps: int, *, karras: bool = False, callback=None):
    """DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Alg. 2. With x = alpha x0 + sigma eps (VP: alpha^2 + sigma^2 = 1), time
    lambda = log(alpha / sigma), h = lambda_i - lambda_{i-1}, r = h_{i-1} / h and x0_i the data
    prediction (from eps or v) at t_i, each step is

        x_{t_i} = (sigma_i / sigma_{i-1}) x - alpha_i (e^{-h} - 1) D,
        D = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}   (written as diffusers groups it, for parity).

    The first step is first order (D = x0_{i-1}: DDIM), and so is the last, to sigma = 0, which
    returns x0 (diffusers' final_sigmas_type "zero" forces it at any step count; lower_order_final's
    rule for < 15 steps changes nothing at order 2). x stays x_t: no input scaling.

    Timesteps as diffusers picks them here: trailing as DDIM; leading and linspace take steps + 1
    and drop the last (leading 901, 811, ... 91 for 10 steps). karras=True (any spacing): Karras et
    al. 2022, "Elucidating the Design Space...", eq. 5, rho = 7, from the schedule's largest sigma
    to its smallest; the model sees each sigma's timestep, interpolated in log sigma, rounded. As in
    diffusers, coefficients are float32 scalars, each update runs in at least float32, and x0 and
    the x returned keep the model's dtype."""
    if cfg.clip_sample or cfg.thresholding:
        raise ValueError("dpmpp_2m supports neither clip_sample nor thresholding; turn them off")
    ts, sigmas = _timesteps_sigmas(cfg, steps, karras)  # sigmas: (steps + 1,) ending in 0
    x0_prev = lambda_prev = None
    for i, t in enumerate(ts):
        alpha_s, sigma_s, lambda_s = _vp(sigmas[i])
        alpha_t, sigma_t, lambda_t = _vp(sigmas[i + 1])
        out = model(x, t)
        if cfg.prediction_type == "epsilon":
            x0 = (x - sigma_s * out) / alpha_s
        else:  # v_prediction: v = alpha eps - sigma x0
            x0 = alpha_s * x - sigma_s * out
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        h = lambda_t - lambda_s  # inf at the last step (sigma = 0): e^{-h} = 0
        c = alpha_t * (torch.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s) * x - c * x0
        if 0 < i < len(ts) - 1:  # second order: D - x0_{i-1} = (x0_{i-1} - x0_{i-2}) / (2r)
            r = (lambda_s - lambda_prev) / h
            x_next = x_next - 0.5 * c * ((1.0 / r) * (x0 - x0_prev))
        x, x0_prev, lambda_prev = x_next.to(x0.dtype), x0, lambda_s
        if callback is not None:
            callback(i, t, x)
    return x


def dpmpp_2m_karras(model, x, cfg: ScheduleConfig, steps: int, *, callback=None):
    """dpmpp_2m on Karras et al.'s sigmas, as a sampler of its own name (--sampler dpmpp-2m-karras)."""
    return dpmpp_2m(model, x, cfg, steps, karras=True, callback=callback)


def _vp(s):
    """sigma_VE = sigma / alpha (diffusers' sigmas, float32 scalar) -> (alpha, sigma, lambda)."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha, torch.log(alpha) - torch.log(s * alpha)


def _timesteps_sigmas(cfg: ScheduleConfig, steps: int, karras: bool):
    """The visited timesteps and their sigmas sqrt((1 - a) / a), float32 (steps + 1,), then 0."""
    ts = inference_timesteps(cfg, steps)  # also checks steps
    if cfg.timestep_spacing != "trailing":
        ts = inference_timesteps(cfg, steps + 1)[:-1]
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:  # diffusers: alpha_bar = 0 would make sigma_max infinite
        ac[-1] = 2**-24
    all_sigmas = ((1 - ac) / ac) ** 0.5  # (T,)
    if not karras:
        return ts, torch.cat([all_sigmas[ts], torch.zeros(1)])
    if cfg.beta_schedule == "squaredcos_cap_v2":
        raise ValueError("dpmpp_2m: karras needs a beta_schedule other than squaredcos_cap_v2")
    rho, lo, hi = 7.0, all_sigmas[0].item(), all_sigmas[-1].item()
    ramp = np.linspace(0, 1, steps)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho  # float64
    log_sigmas = np.log(all_sigmas.numpy())  # (T,) increasing with t
    ts = np.interp(np.log(sigmas), log_sigmas, np.arange(len(log_sigmas))).round()  # float t
    return [int(t) for t in ts], torch.tensor([*sigmas, 0.0], dtype=torch.float32)
