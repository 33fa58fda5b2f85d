"""The noise schedule: how much of the clean image survives at each training timestep.

Training sees x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, DDPM, eq. 4);
the rest follows from alpha_bar = alphas_cumprod(cfg), in diffusers' float32 order (parity)."""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class ScheduleConfig:
    """diffusers' scheduler_config.json: the fields that change numbers. Defaults: SDXL base 1.0."""

    num_train_timesteps: int = 1000  # T: timesteps the model was trained on
    beta_start: float = 0.00085  # beta at t = 0
    beta_end: float = 0.012  # beta at t = T-1
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES
    trained_betas: tuple | None = None  # explicit betas; overrides the three fields above
    prediction_type: str = "epsilon"  # what the UNet outputs: one of PREDICTION_TYPES
    timestep_spacing: str = "leading"  # how N sampling steps are picked: TIMESTEP_SPACINGS
    steps_offset: int = 1  # added to "leading" timesteps (SD and SDXL use 1)
    set_alpha_to_one: bool = False  # alpha_bar "before" t=0: 1.0 if True, else alpha_bar[0]
    clip_sample: bool = False  # DDIM: clamp predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0
    thresholding: bool = False  # DDIM: dynamic thresholding of x0 (Saharia et al. 2022)
    dynamic_thresholding_ratio: float = 0.995  # quantile of |x0| used as the threshold
    sample_max_value: float = 1.0  # largest threshold dynamic thresholding may use
    rescale_betas_zero_snr: bool = False  # make alpha_bar[T-1] = 0 (Lin et al. 2024, Alg. 1)

    def __post_init__(self):
        for name, choices in zip(("beta_schedule", "prediction_type", "timestep_spacing"),
                                 (BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS)):
            if getattr(self, name) not in choices:
                raise _unknown(name, getattr(self, name), choices)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.trained_betas is not None:
            self.trained_betas = tuple(float(b) for b in self.trained_betas)

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        """Read a diffusers scheduler config dict; keys that change no number here are ignored."""
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


def _unknown(name, value, choices) -> ValueError:
    return ValueError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- the schedule


def betas(cfg: ScheduleConfig) -> torch.Tensor:
    """beta_t for t = 0..T-1, float32 (T,)."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":  # Ho et al. 2020, Sec. 4
        b = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        b = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        b = _cosine_betas(T)
    else:
        raise _unknown("beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
    return _rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", sec. 3.2): alpha_bar(s) =
    cos^2((s + 0.008) / 1.008 * pi/2), s = t/T; beta = 1 - alpha_bar(s')/alpha_bar(s), capped."""
    ab = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    b = [min(1 - ab[i + 1] / ab[i], max_beta) for i in range(T)]
    return torch.tensor(b, dtype=torch.float32)


def _rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift and scale sqrt(alpha_bar) to end at 0 (pure noise at t = T-1), keeping it at t = 0."""
    sqrt_ab = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    ab = ((sqrt_ab - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])  # 1 - per-step alphas: undo the cumprod


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32 (T,): the signal fraction in x_t."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def final_alpha_cumprod(cfg: ScheduleConfig, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar "after" the last step (t_prev < 0): 1.0 (clean) or alpha_bar[0] (SDXL's choice)."""
    return torch.tensor(1.0) if cfg.set_alpha_to_one else alphas_cumprod[0]


# ----------------------------------------------------------------------------- forward process


def _per_sample(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at each sample's timestep, shaped to broadcast against `like`: (B, 1, 1, 1)."""
    a = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0, noise, t, alphas_cumprod):
    """q(x_t | x0) sampled with the given noise (Ho et al. 2020, eq. 4). t: LongTensor (B,)."""
    a = _per_sample(alphas_cumprod, t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(x0, noise, t, alphas_cumprod):
    """The v-prediction target sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""
    a = _per_sample(alphas_cumprod, t, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def training_target(x0, noise, t, alphas_cumprod, prediction_type: str):
    """What the UNet should output for x_t = add_noise(x0, noise, t): eps, or v."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    raise _unknown("prediction_type", prediction_type, PREDICTION_TYPES)


def predicted_x0_eps(model_output, x_t, alpha_bar, prediction_type: str):
    """(predicted x0, predicted eps) from the model output at alpha_bar (broadcastable to x_t), by
    x_t = sqrt(a) x0 + sqrt(1-a) eps and, for v, v = sqrt(a) eps - sqrt(1-a) x0."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5, model_output
    if prediction_type == "v_prediction":
        x0 = alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * model_output
        return x0, alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x_t
    raise _unknown("prediction_type", prediction_type, PREDICTION_TYPES)


def snr(t, alphas_cumprod):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t (LongTensor), for min-SNR;
    computed as (sqrt(a) / sqrt(1-a))^2 like diffusers' compute_snr, so weights agree to the bit."""
    ac = alphas_cumprod.to(t.device)
    return (ac[t] ** 0.5 / (1.0 - ac[t]) ** 0.5) ** 2


# ----------------------------------------------------------------------------- sampling timesteps


def inference_timesteps(cfg: ScheduleConfig, steps: int) -> list[int]:
    """The `steps` training timesteps a sampler visits, largest first, as diffusers' DDIMScheduler
    picks them. Spacings (Lin et al. 2024, Table 2): leading (SD/SDXL: 951 ... 1 in 50), linspace,
    trailing (numpy's float arange as diffusers; its extra -1 at 61, 103, ... steps is dropped)."""
    T = cfg.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and num_train_timesteps={T}, got {steps}")
    if cfg.timestep_spacing == "leading":
        ts = np.arange(steps)[::-1] * (T // steps) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps))[:steps] - 1
    elif cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    else:
        raise _unknown("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
    ts = [int(t) for t in ts]
    if ts[0] >= T:
        raise ValueError(f"steps={steps} with steps_offset={cfg.steps_offset} reaches timestep "
                         f"{ts[0]} >= num_train_timesteps={T}; use fewer steps or steps_offset=0")
    return ts
