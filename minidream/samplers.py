"""Samplers: walk the noise schedule backwards, from x_T (unit Gaussian noise) to x_0 (a latent).

One signature, as in k-diffusion: x0 = sampler(model, x_T, cfg, steps, *, ..., callback=None), with
`model(x, t)` the UNet output (eps or v) at integer timestep t, prompts and guidance bound in
(`with_guidance`), and `callback(i, t, x)` run after model evaluation i. Each sampler matches its
diffusers scheduler (default settings) to float32 rounding; each quirk kept is named where it is."""

import torch

from .schedule import (ScheduleConfig, alphas_cumprod, final_alpha_cumprod, inference_timesteps,
                       predicted_x0_eps)


def _walk(cfg: ScheduleConfig, steps: int, device):
    """(visited timesteps, stride T // steps, alpha_bar (T,), alpha_bar "after" t = 0)."""
    ts, ac = inference_timesteps(cfg, steps), alphas_cumprod(cfg).to(device)
    return ts, cfg.num_train_timesteps // steps, ac, final_alpha_cumprod(cfg, ac)


def ddim(model, x, cfg: ScheduleConfig, steps: int, *, eta=0.0, generator=None, callback=None):
    """DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12,

        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,

    with sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (eq. 16), a = alpha_bar:
    eta = 0 is deterministic DDIM, eta = 1 has DDPM's posterior variance. diffusers quirk kept: the
    "previous" timestep is always t - T // steps, even where trailing or linspace visit another."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    ts, stride, ac, final = _walk(cfg, steps, x.device)
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[t - stride] if t - stride >= 0 else final
        x0, eps = predicted_x0_eps(model(x, t), x, a_t, cfg.prediction_type)
        x0 = _clip_x0(x0, cfg)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            device = x.device if generator is None else generator.device  # as diffusers
            z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            x = x + sigma * z.to(x.device)
        if callback is not None:
            callback(i, t, x)
    return x


def pndm(model, x, cfg: ScheduleConfig, steps: int, *, start=None, callback=None):
    """PNDM: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds".

    Every step moves x from t to t - T // steps with the transfer part (eq. 9) driven by PLMS
    (eq. 13): 4th-order Adams-Bashforth over the last four model outputs. `start` opens the history:
    `_plms_start` by default (SD/SDXL's choice, diffusers' skip_prk_steps), or the paper's pseudo
    Runge-Kutta warm-up (minidream.more_samplers.prk_start, eq. 12). diffusers quirk kept: outputs
    are combined as the model gave them (v for v_prediction), made eps only in the transfer step."""
    ts, stride, ac, final = _walk(cfg, steps, x.device)
    callback = callback or (lambda i, t, x: None)

    def step(x, out, t, t_prev):  # the transfer part with this schedule bound in
        return _pndm_step(x, out, t, t_prev, ac, final, cfg.prediction_type)

    x, outs, rest, i = (start or _plms_start)(model, x, ts, stride, step, callback)  # i: evaluated
    for t in rest:
        outs = outs[-3:] + [model(x, t)]  # keep the 4 most recent outputs
        x = step(x, _adams_bashforth(outs), t, t - stride)
        callback(i, t, x)
        i += 1
    return x


def _pndm_step(x, out, t, t_prev, ac, final, prediction_type):
    """PNDM's transfer part phi (Liu et al. 2022, eq. 9): move x from alpha_bar a_t to a_prev
    along eps. Algebraically this is the DDIM eta = 0 step, written the paper's way."""
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else final
    eps = predicted_x0_eps(out, x, a_t, prediction_type)[1]
    eps_coeff_denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / eps_coeff_denom


def _adams_bashforth(outs):
    """Adams-Bashforth over the last 2-4 outputs (newest last); orders 2-3 bridge the start."""
    e = outs[::-1]  # e[0] newest
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


def _plms_start(model, x, ts, stride, step, callback):
    """diffusers' PLMS start: a pseudo improved-Euler (Heun) step as two evaluations (hence the
    repeated second timestep in diffusers' list), the averaged step taken from the *old* x. Quirks:
    e1 is not kept in the history (the PLMS loop evaluates t1 again), and the averaged step runs
    from t1 + stride, which is t0 for leading spacing but not always for trailing."""
    t0 = ts[0]
    e0 = model(x, t0)
    x_start, x = x, step(x, e0, t0, t0 - stride)
    callback(0, t0, x)
    if len(ts) == 1:
        return x, [e0], [], 1
    t1 = ts[1]
    e1 = model(x, t1)
    x = step(x_start, (e1 + e0) / 2, t1 + stride, t1)
    callback(1, t1, x)
    return x, [e0], ts[1:], 2


def _clip_x0(x0, cfg: ScheduleConfig):
    """Optional clamping of the predicted x0, off by default (latents are not bounded to [-1, 1]).
    Dynamic thresholding (Saharia et al. 2022, "Imagen"): per sample, x0 clamped to [-s, s] and
    divided by s, s = a quantile of |x0| kept within [1, sample_max_value]."""
    if cfg.thresholding:
        wide = torch.promote_types(x0.dtype, torch.float32)  # quantile needs float32 or float64
        flat = x0.to(wide).reshape(x0.shape[0], -1)  # (B, C*H*W)
        s = torch.quantile(flat.abs(), cfg.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=cfg.sample_max_value)[:, None]  # (B, 1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)
    if cfg.clip_sample:
        return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


# ----------------------------------------------------------------------------- guidance


def guidance(out_uncond, out_cond, scale: float, rescale: float = 0.0):
    """Classifier-free guidance (Ho & Salimans 2022) on eps or v: uncond + scale * (cond - uncond),
    the paper's (1 + w) cond - w uncond, w = scale - 1. rescale > 0 (Lin et al. 2024, sec. 3.4):
    blend in the guided output rescaled to out_cond's per-sample std (less over-exposure)."""
    guided = out_uncond + scale * (out_cond - out_uncond)
    if rescale > 0:
        dims = list(range(1, guided.ndim))
        std_ratio = out_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * (guided * std_ratio) + (1 - rescale) * guided
    return guided


def with_guidance(model, scale: float, rescale: float = 0.0):
    """Turn `model(x2, t)` on a doubled batch [uncond; cond] (diffusers' order) into a guided
    `model(x, t)`: one UNet call per step serves both halves."""

    def guided(x, t):
        out_uncond, out_cond = model(torch.cat([x, x]), t).chunk(2)
        return guidance(out_uncond, out_cond, scale, rescale)

    return guided


SAMPLERS = {"ddim": ddim, "pndm": pndm}  # by name (--sampler); more_samplers.SAMPLERS has them all
