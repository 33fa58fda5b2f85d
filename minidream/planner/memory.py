"""The T4 memory planner: will this training run fit a 16 GB GPU?  (`python train.py ... --plan`)

It runs the real code on fake tensors (fake_run.py: shapes and dtypes, no data, no compute), with
the model built from its config.json files alone, so a user can check before downloading 7 GB:

    model configs -> meta-device model in the run's dtypes -> the method (LoRA / full) set up on it
    -> fake CPU tensors -> step.training_step (forward, loss, backward; the same function train()
       calls) under CUDA's autocast policy, counting the bytes alive at every op
    -> + optimizer states and the optimizer step (bitsandbytes cannot run on fake tensors: counted
       from optimizer_state_bytes, which matches AdamW8bit byte for byte)
    -> + a stated margin -> compared with what a T4 offers

The other phases of a run that put weights on the GPU are planned the same way: encoding the
latent cache (everything loaded, VAE encode), generating class images and validation grids (UNet
with guidance, batch 2, then a VAE decode). report.py prints the plan and the time per step,
estimated from the step's FLOPs (torch.utils.flop_counter) at an assumed fraction of a T4's peak.

The model is planned as train.py would load it: the UNet's Linears quantised as --base-weights says
(QuantLinear codes + scales; the per-layer dequantised weights are temporaries the fake run
counts), the VAE tiled as --vae-tiling says. recipes.py searches those settings and gradient
checkpointing for a card of N GB (--gpu-memory N).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minidream.formats.checkpoint import CheckpointError, build_text_encoder, build_unet, build_vae
from minidream.formats import detect, text_encoder_parts, text_encoder_weights, unet_weights, vae_weights
from minidream.config import OPTIMIZERS, TrainingError, check_config, fill_defaults
from minidream.formats.loading import parameters_on_meta
from minidream.methods.registry import build_method
from minidream.model import Model
from minidream.formats.models import REPO, SDXL_LOCATIONS
from minidream.lowmem.tiled_vae import use_tiled_vae
from minidream.optim import BNB_MIN_8BIT_SIZE, DTYPES, Precision
from minidream.pipeline import unet_closure
from minidream.quant.linear import quantise_model, quantised_layers
from minidream.planner.fake_run import (ByteCounter, ShapeTokenizer, count_gradients, cuda_autocast_policy,
                                        fake_tensors, materialize)
from minidream.schedule import ScheduleConfig, alphas_cumprod as alphas_cumprod_of
from minidream.step import Batch, training_step
from minidream.text import TextEncoders, encode_text
from minidream.vae import vae_dtype

GiB = 2**30
T4_USABLE_GIB = 15.0  # a T4's 16 GB is 15360 MiB as nvidia-smi reports it; the CUDA context comes out of it
MARGIN_FIXED_GIB = 0.6  # assumed: CUDA context (~0.4 GiB with lazy module loading) + cuBLAS/cuDNN workspaces
MARGIN_FRACTION = 0.10  # assumed: caching-allocator fragmentation (reserved - allocated) as a fraction of the peak
BNB_BLOCK = 256  # bitsandbytes AdamW8bit: one fp32 scale per block of 256 values


def optimizer_state_bytes(params, name: str = "adamw8bit") -> int:
    """Bytes of Adam's two moments for `params` (shapes only: meta tensors work). AdamW: two fp32 moments.
    AdamW8bit: two uint8 moments plus an fp32 scale per 256-element block each; under 4096 elements, fp32."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    total = 0
    for p in params:
        n = p.numel()
        total += 8 * n if name == "adamw" or n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    return total


# ----------------------------------------------------------------------------- the model, on meta

def read_configs(path) -> dict:
    """{"unet", "vae", "text_encoder", ["text_encoder_2"], "scheduler"} config dicts of a diffusers folder
    (config.json files are enough: no weights needed) or of a single file (tensor headers only)."""
    path = Path(path)
    if path.is_dir():
        configs = {}
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            file = path / part / "config.json"
            if file.is_file():
                configs[part] = json.loads(file.read_text())
        scheduler = path / "scheduler" / "scheduler_config.json"
        configs["scheduler"] = json.loads(scheduler.read_text()) if scheduler.is_file() else {}
        missing = [p for p in ("unet", "vae", "text_encoder") if p not in configs]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(p + '/config.json' for p in missing)}: the planner needs "
                                  "the config.json files of a diffusers folder (the weights are not needed)")
        return configs
    info = detect(path)  # a single file: configs follow from the tensor shapes in its header
    configs = {"unet": unet_weights(path, expect=None)[0], "vae": vae_weights(path, expect=None)[0], "scheduler": {}}
    for part in text_encoder_parts(path):
        configs[part] = text_encoder_weights(path, part, expect=info.family or None)[0]
    return configs


def read_vae_config(path) -> dict:
    """The VAE config of --vae: a VAE folder, a model folder, or a single file (header only)."""
    path = Path(path)
    for file in (path / "config.json", path / "vae" / "config.json"):
        if file.is_file():
            return json.loads(file.read_text())
    return vae_weights(path, expect=None)[0]


def meta_model(configs: dict, weight_dtype: torch.dtype, vae_dtype_wanted: torch.dtype,
               base_weights: str = "fp16", vae_tiling: int = 0):
    """A minidream Model whose parameters live on `meta` in the dtypes load_model would give them:
    the UNet's Linears quantised as `base_weights` says (QuantLinear codes + scales, as
    load_weights(quantise=...) leaves them), the VAE tiled as train.py --vae-tiling wraps it."""
    with parameters_on_meta():
        unet, vae = build_unet(configs["unet"]), build_vae(configs["vae"])
        encoders = [build_text_encoder(configs[p]) if p in configs else None
                    for p in ("text_encoder", "text_encoder_2")]
    unet.to(weight_dtype).eval().requires_grad_(False)
    vae.to(vae_dtype(vae.config, vae_dtype_wanted)).eval().requires_grad_(False)
    for enc in encoders:
        if enc is not None:
            enc.to(weight_dtype).eval().requires_grad_(False)
    quantise_model(unet, base_weights)  # meta in, meta out: shapes and dtypes of the codes and scales
    text = TextEncoders(ShapeTokenizer(), encoders[0], ShapeTokenizer() if encoders[1] is not None else None,
                        encoders[1])
    schedule = {k: v for k, v in configs["scheduler"].items() if k in ScheduleConfig.__dataclass_fields__}
    model = Model(unet, vae, text, ScheduleConfig(**schedule))
    return use_tiled_vae(model, vae_tiling) if vae_tiling else model


def t4_precision(requested: str) -> tuple[Precision, str]:
    """optim.resolve_precision for a T4, decided here (this machine may have no GPU), on the fake CPU device."""
    note = ""
    if requested == "bf16":
        requested, note = "fp16", "a T4 has no native bf16: planned in fp16 with loss scaling, as train.py would run"
    dtype = DTYPES[requested]
    return Precision(requested, torch.device("cpu"), dtype, None if requested == "fp32" else dtype,
                     requested == "fp16"), note


def modules_of(model, text: bool = True, vae: bool = False) -> list[torch.nn.Module]:
    """The model's parts on the GPU: the UNet, the text encoders if `text`, the VAE if `vae`."""
    parts = [model.unet, *([model.text.text_encoder, model.text.text_encoder_2] if text else []),
             *([model.vae] if vae else [])]
    return [m for m in parts if m is not None]


def tensor_bytes(modules, params=None) -> int:
    """Bytes of the parameters and buffers of `modules` (of `params` only, when given)."""
    tensors = params if params is not None else [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


# ----------------------------------------------------------------------------- one fake step

@dataclass
class StepMemory:
    """Bytes of one training step at its peak (fake run + optimizer arithmetic)."""

    frozen: int  # frozen weights and buffers on the GPU
    trained: int  # trained parameters (fp32)
    gradients: int  # all gradients (fp32), alive from backward until the optimizer step
    gradients_at_peak: int  # the part of them already written when the forward/backward peak happened
    optimizer_states: int  # Adam's moments, alive for the whole run
    optimizer_temp: int  # temporaries of the optimizer step (torch AdamW's foreach sqrt: 4 bytes per value)
    activations: int  # activations, saved tensors, autocast weight casts, temporaries, at the peak
    peak_forward_backward: int  # weights + states + gradients so far + activations
    peak_optimizer: int  # weights + states + gradients + optimizer temporaries
    flops: int  # forward + recomputation + backward
    attention: list = field(default_factory=list)  # which SDPA kernels ran

    @property
    def peak(self) -> int:
        return max(self.peak_forward_backward, self.peak_optimizer)


def optimizer_temporaries(params, name: str, cuda: bool) -> int:
    """Bytes the optimizer step allocates on top of weights, gradients and states (read off torch's code).

    torch AdamW runs its foreach implementation on CUDA: one sqrt(v) temporary for ALL trained
    values at once (4 bytes each); on the CPU it updates one tensor at a time, with two temporaries
    of the largest tensor's size (sqrt(v), then its quotient). AdamW8bit updates each tensor in place.
    """
    if name != "adamw" or not params:
        return 0
    return sum(4 * p.numel() for p in params) if cuda else 2 * 4 * max(p.numel() for p in params)


def fake_batch(rows: int, num_instance: int, latent: tuple[int, int], sdxl: bool):
    """A step.Batch of fake tensors with the shapes and dtypes latent_cache.draw_batch returns."""
    shape = (rows, 4, *latent)
    return Batch(torch.empty(shape), torch.empty(shape), torch.zeros(rows, dtype=torch.long),
                 torch.empty(rows, 6) if sdxl else None, torch.zeros(rows, dtype=torch.long), num_instance)


def plan_step(model, method, cfg, precision: Precision, fake, block: int = 512, cuda: bool = True) -> StepMemory:
    """Run step.training_step on fake tensors (inside `fake`) for the model as `method` set it up on meta."""
    trained = method.parameters()
    trains_text = method.trains_text(cfg)
    resident = modules_of(model, text=trains_text)  # offload_encoders leaves only these on the GPU
    states = optimizer_state_bytes(trained, cfg.optimizer)
    states += 4 * sum(p.numel() for p in trained) if cfg.ema_decay else 0  # --ema-decay's fp32 average
    grads = sum(p.numel() * 4 for p in trained)
    opt_temp = optimizer_temporaries(trained, cfg.optimizer, cuda)
    alphas_cumprod = alphas_cumprod_of(model.schedule)
    rows, side = cfg.batch_size * (2 if cfg.prior else 1), cfg.resolution // model.vae_scale
    micro_steps = min(cfg.grad_accum, 2)  # a second micro-batch runs with every gradient already present
    counter = ByteCounter(block)
    with fake, counter, cuda_autocast_policy(cuda):
        for module in resident:
            materialize(module)
        hooks = count_gradients(trained, counter)
        weights = counter.live
        if trains_text:
            embed = lambda: encode_text(model.text, ["instance prompt", "class prompt"])  # noqa: E731
        else:  # the cached prompt table, fp32 as latent_cache keeps it
            context = torch.empty(2, 77, model.unet.config.cross_attention_dim)
            pooled = torch.empty(2, model.text.text_encoder_2.config.projection_dim) if model.is_sdxl else None
            embed = lambda: (context, pooled)  # noqa: E731
        scaler = torch.amp.GradScaler("cpu", enabled=precision.use_grad_scaler)
        counter.reset_peak()
        counter.flops = 0
        for _ in range(micro_steps):
            training_step(model.unet, fake_batch(rows, cfg.batch_size, (side, side), model.is_sdxl), embed, alphas_cumprod,
                          prediction_type=model.schedule.prediction_type, prior_weight=cfg.prior_weight,
                          snr_gamma=cfg.snr_gamma, autocast_dtype=precision.autocast_dtype, scaler=scaler,
                          accumulation=cfg.grad_accum)
        for h in hooks:
            h.remove()
        for p in trained:  # apply_gradients ends with zero_grad(set_to_none=True)
            p.grad = None
    grads_at_peak = counter.peak_tagged.get("grad", 0)
    return StepMemory(
        frozen=tensor_bytes(resident) - tensor_bytes(resident, trained), trained=tensor_bytes(resident, trained),
        gradients=grads, gradients_at_peak=grads_at_peak, optimizer_states=states, optimizer_temp=opt_temp,
        activations=counter.peak - weights - grads_at_peak, peak_forward_backward=counter.peak + states,
        peak_optimizer=weights + states + grads + opt_temp,
        flops=counter.flops // micro_steps * cfg.grad_accum, attention=counter.attention_kernels(),
    )


def plan_sampling(model, resolution: int, fake, block: int = 512, extra: int = 0,
                  flops: dict | None = None) -> dict[str, int]:
    """Peaks (bytes) of the phases with every part of the model on the GPU: VAE encode (latent cache),
    one UNet call with guidance (batch 2: class images, validation grids), VAE decode (one image).
    `extra`: bytes held besides the model (validation: the optimizer states). `flops`: a dict that
    gets each phase's FLOPs (for the time estimates of minidream/planner/recipes.py)."""
    counter, peaks, flops = ByteCounter(block), {}, {} if flops is None else flops
    with fake, counter, torch.no_grad():
        for module in modules_of(model, vae=True):
            if next(module.parameters()).device.type == "meta":
                materialize(module)
            else:  # already fake (the training step's): count what it holds
                for t in (*module.parameters(), *module.buffers()):
                    counter.add(t)

        for name, run in sampling_phases(model, resolution).items():
            counter.reset_peak()
            counter.flops = 0
            run()
            peaks[name], flops[name] = counter.peak + extra, counter.flops
    return peaks


def sampling_phases(model, resolution: int, device="cpu") -> dict:
    """name -> a function running that phase once on zero inputs on `device`: VAE encode (one
    image), one UNet call with guidance (batch 2), VAE decode (one image). plan_sampling runs them
    on fake tensors; benchmarks/gpu_check.py runs them on a GPU to measure what was predicted."""
    side, vae_dtype_ = resolution // model.vae_scale, next(model.vae.parameters()).dtype
    context = torch.zeros(2, 77, model.unet.config.cross_attention_dim, device=device)
    sdxl = model.is_sdxl
    pooled = torch.zeros(2, model.text.text_encoder_2.config.projection_dim, device=device) if sdxl else None
    time_ids = torch.zeros(2, 6, device=device) if sdxl else None
    denoiser = unet_closure(model, context, pooled, time_ids)
    return {"vae_encode": lambda: model.vae.encode(torch.zeros(1, 3, resolution, resolution,
                                                               dtype=vae_dtype_, device=device)),
            "unet_guidance": lambda: denoiser(torch.zeros(2, 4, side, side, device=device), 500),  # eps or v
            "vae_decode": lambda: model.vae.decode(torch.zeros(1, 4, side, side, dtype=vae_dtype_, device=device))}


# ----------------------------------------------------------------------------- the whole run

def margin(peak: int) -> int:
    """What the GPU needs beyond the bytes tensors hold (both parts are assumptions, see the top)."""
    return int(MARGIN_FIXED_GIB * GiB + MARGIN_FRACTION * peak)


@dataclass
class MemoryPlan:
    """The planner's answer for one TrainConfig on a GPU of `usable_gib` (a T4 unless said)."""

    title: str  # what was planned, in one line
    step: StepMemory
    phases: dict[str, int]  # other phases of the run: name -> peak allocated bytes
    notes: list[str] = field(default_factory=list)
    cfg: object = None  # the TrainConfig planned, presets filled
    flops: dict = field(default_factory=dict)  # FLOPs of one vae_encode, unet_guidance, vae_decode
    quantised_weights: int = 0  # weights of the UNet's QuantLinears (each dequantised per call)
    vae_fp32: bool = True  # the VAE runs in fp32 (SDXL's own; an fp16-fix VAE runs in fp16)
    usable_gib: float = T4_USABLE_GIB
    card: str = "T4"  # what the verdict names: "T4", "8 GB GPU"

    def worst(self) -> tuple[str, int]:
        """(phase name, peak allocated bytes) of the phase with the largest peak."""
        return max([("training step", self.step.peak), *self.phases.items()], key=lambda kv: kv[1])

    @property
    def predicted(self) -> int:
        """Predicted GPU memory of the whole run: the worst peak plus the margin."""
        peak = self.worst()[1]
        return peak + margin(peak)

    @property
    def fits(self) -> bool:
        return self.predicted <= self.usable_gib * GiB


def memoised(runs: dict | None, key: tuple, run):
    """run(), or its earlier result kept in `runs` under `key` (a recipe search repeats fake runs)."""
    if runs is None:
        return run()
    if key not in runs:
        runs[key] = run()
    return runs[key]


def plan_training(cfg, runs: dict | None = None, with_phases: bool = True) -> MemoryPlan:
    """Plan `cfg` (a TrainConfig; unset settings get the recipe's values) on a T4. `runs`: a dict
    keeping the fake runs for the next call (recipes.py plans many recipes of one run);
    with_phases=False: the training step only."""
    if cfg.method not in ("lora", "full", "pivotal"):
        raise TrainingError(f"--plan covers --method lora, full and pivotal, not {cfg.method!r} (textual inversion "
                            "trains a few KB; its memory is that of pivotal tuning, less the UNet's LoRA)")
    cfg = replace(cfg)
    configs = read_configs(cfg.model)
    if cfg.vae:  # e.g. an fp16-fix VAE, which runs in fp16 instead of fp32
        configs["vae"] = read_vae_config(cfg.vae)
    scale = 2 ** (len(configs["vae"].get("block_out_channels", (0,) * 4)) - 1)
    notes = [n for n in [fill_defaults(cfg, (configs["unet"].get("sample_size") or 64) * scale)] if n]
    check_config(cfg)
    precision, note = t4_precision(cfg.precision)
    notes += [note] if note else []
    base, tiles, text = cfg.base_weights, cfg.vae_tiling, cfg.train_text_encoder

    def model_as_loaded():  # as train.py's load_model leaves it: quantised UNet, tiled VAE
        return meta_model(configs, precision.weight_dtype, precision.weight_dtype, base, tiles)

    def trained_model():
        model = model_as_loaded()
        return model, build_method(model, cfg, "sks", "person")

    def sampling(model, extra: int = 0):
        flops = {}
        return plan_sampling(model, cfg.resolution, fake_tensors(), extra=extra, flops=flops), flops

    def facts(model):  # what the title and the time estimates need to know of the model
        quantised = sum(math.prod(layer.weight_shape) for _, layer in quantised_layers(model.unet))
        return quantised, model.is_sdxl, model.unet.config.cross_attention_dim, \
            next(model.vae.parameters()).dtype == torch.float32

    step = memoised(runs, ("step", text, base, cfg.gradient_checkpointing),
                    lambda: plan_step(*trained_model(), cfg, precision, fake_tensors()))
    phases, flops = {}, {}
    if with_phases:  # load_model puts everything on the GPU: class images, then the latent cache
        before, flops = memoised(runs, ("before", text, base, tiles), lambda: sampling(model_as_loaded()))
        phases["latent cache: VAE encode"] = before["vae_encode"]
        if cfg.prior:
            phases["class images: UNet with guidance"] = before["unet_guidance"]
            phases["class images: VAE decode"] = before["vae_decode"]
    if with_phases and cfg.validate_every:  # the trained model and the optimizer states
        after, _ = memoised(runs, ("after", text, base, tiles),
                            lambda: sampling(trained_model()[0], step.optimizer_states))
        phases["validation: UNet with guidance"] = after["unet_guidance"]
        phases["validation: VAE decode"] = after["vae_decode"]
    quantised, sdxl, context, vae_fp32 = memoised(runs, ("facts", base), lambda: facts(model_as_loaded()))
    family = "SDXL" if sdxl else f"SD ({context}-wide context)"
    what = {"lora": f"{'DoRA' if cfg.dora else 'LoRA'} rank {cfg.rank}", "full": "full fine-tuning (fp32 master weights)",
            "pivotal": f"LoRA rank {cfg.rank} + a new word (pivotal tuning)"}[cfg.method]
    text = ("text encoders trained" + (" (LoRA)" if cfg.method == "lora" else "")) if text else "text cached"
    text = "text encoded every step (the new word trains)" if cfg.method == "pivotal" else text
    classes = f" + {cfg.batch_size} class" if cfg.prior else ""
    title = (f"{family} from {cfg.model}: {what}, {cfg.resolution} px, batch {cfg.batch_size}{classes}, "
             f"{precision.name}, base weights {base}, VAE {f'in {tiles} px tiles' if tiles else 'untiled'}, "
             f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
             f"{cfg.optimizer}, {text}, grad accumulation {cfg.grad_accum}")
    return MemoryPlan(title, step, phases, notes, cfg, flops, quantised, vae_fp32)


def default_plan_model() -> str:
    """SDXL base from weights/ when downloaded, else its bundled config.json files."""
    for location in SDXL_LOCATIONS:
        if (REPO / location).exists():
            return str(REPO / location)
    return str(REPO / "configs" / "sdxl-base-1.0")
