"""Which recipe fits a GPU of N GB, and the fastest of those: `train.py --plan --gpu-memory N`
prints the search, `train.py --gpu-memory N` trains with its choice.

A recipe is three settings that trade time for GPU memory:

    gradient checkpointing  on: each block's activations recomputed in backward (more FLOPs)
    --base-weights          fp16 / int8 / nf4: the frozen UNet's Linear weights in 16, 8 or 4.25
                            bits, dequantised layer by layer in every call (minidream/quant)
    --vae-tiling            0 / 512 / 256 px: the VAE's encodes and decodes in overlapping tiles

Every combination (a setting the user passed stays as passed: explicit flags win) is planned as
`--plan` plans one run (memory.plan_training: the training step, then every other phase, on fake
tensors; fake runs that recipes share are made once), and the fastest one whose whole run is
predicted to fit is chosen. Where the step fits without checkpointing, a recipe without it wins
(it is faster). Text-encoder training is never switched on; when it was asked for and nothing fits
with it, the search says what would fit without it.

Usable memory of a card sold as N GB: N x 15/16 GiB, the T4's rule (16 GB -> 15360 MiB as
nvidia-smi shows it; memory.T4_USABLE_GIB). Cards without ECC show nearly N GiB, so the rule is
conservative by up to N/16 GiB. The CUDA context and workspaces are in the planner's margin.

Time, to rank the recipes that fit (for a T4-class card; every rate is an assumption, nothing
here was measured on a GPU):
    compute       FLOPs counted in the fake runs at 30% of the T4's 65 TFLOP/s fp16 peak (of its
                  8.1 TFLOP/s fp32 for a VAE in fp32, SDXL's own)
    dequantising  report.dequant_seconds per pass over the quantised layers (bytes moved at
                  320 GB/s): one pass per sampler step, two per training step, three with
                  checkpointing
    the run       the run's Work (run_work: what train.py computes) priced phase by phase, the
                  phases summing to the whole run (Timing.phases, Timing.run_s):
                    class images    class_steps guided UNet calls and a decode each (all assumed
                                    missing)
                    latent cache    a VAE encode per photo view (10 photos assumed) and per class
                                    image
                    training steps  steps x s/step
                    validation      validation_steps guided UNet calls and a decode per image
    batching      a FLOP count grows with the images in a call, so --class-batch changes none: a
                  batch of k class images costs k images' FLOPs. Only the dequantisation, once
                  per UNet call, is shared by a batch's images (auto, --class-batch 0, is decided
                  on the GPU: counted as one image per call). A GPU may run larger batches at a
                  higher efficiency; no such speed-up is assumed.
Tiling's cost is its extra FLOPs (tiles overlap by a quarter of their side): rough, since small
tiles also run less efficiently than one large image.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from minidream.config import VALIDATION_TEMPLATES, TrainingError
from minidream.planner.memory import GiB, T4_USABLE_GIB, MemoryPlan, plan_training
from minidream.planner.report import (OPTIMIZER_BYTES_PER_VALUE, T4_BANDWIDTH, T4_EFFICIENCY, T4_FP16_TFLOPS,
                                      dequant_passes, dequant_seconds, format_plan)

T4_FP32_TFLOPS = 8.1  # T4 datasheet: fp32 peak
ASSUMED_PHOTOS = 10  # subject photos the latent cache encodes (views_per_image times each)
OPTIONS = {  # the settings a recipe chooses, each option from fastest to smallest
    "gradient_checkpointing": (False, True),
    "base_weights": ("fp16", "int8", "nf4"),
    "vae_tiling": (0, 512, 256),
}


def usable_gib(gb: float) -> float:
    """GiB a card sold as `gb` GB offers to tensors + the planner's margin (see the top)."""
    return gb * T4_USABLE_GIB / 16


def as_flag(name: str, value) -> str:
    """A setting as train.py's flag: --gradient-checkpointing, --base-weights int8, ..."""
    flag = "--" + name.replace("_", "-")
    return (flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag} {value}"


def recipe_flags(cfg) -> str:
    return " ".join(as_flag(name, getattr(cfg, name)) for name in OPTIONS)


@dataclass
class Work:
    """What a whole run computes, in the units estimate_time prices (see the top)."""

    steps: int  # optimizer steps
    class_images: int  # class images generated (all assumed missing)
    class_steps: int  # guided UNet calls per class image: one per sampler step
    class_batch: int  # class images per UNet call: they share its dequantisation, nothing else
    encodes: int  # one-image VAE encodes: the latent cache's photo views and class images
    validation_images: int  # each one decode
    validation_calls: int  # guided UNet calls of all validation images together


def run_work(cfg) -> Work:
    """The Work of train.py's run of `cfg` (presets filled), for ASSUMED_PHOTOS subject photos."""
    classes = cfg.num_class_images if cfg.prior else 0
    grids = cfg.steps // cfg.validate_every + 1 if cfg.validate_every else 0  # + the one at step 0
    prompts = len(cfg.validation_prompts or [*VALIDATION_TEMPLATES, "class"])
    images = grids * prompts * len(cfg.validation_seeds)
    return Work(cfg.steps, classes, cfg.class_steps, cfg.class_batch or 1,
                ASSUMED_PHOTOS * cfg.views_per_image + classes, images, images * cfg.validation_steps)


@dataclass
class Timing:
    step_s: float  # one optimizer step: compute, dequantisation, the optimizer's memory traffic
    phases: dict[str, float]  # phase of the run -> its seconds (see the top)

    @property
    def run_s(self) -> float:
        """The whole run: the sum of its phases."""
        return sum(self.phases.values())


def estimate_time(plan: MemoryPlan, work: Work | None = None) -> Timing:
    """Estimated seconds of a step and of each phase of the whole run of a planned recipe (see the
    top). `work`: what the run computes (default: train.py's run of plan.cfg, run_work)."""
    cfg, flops = plan.cfg, plan.flops
    work = run_work(cfg) if work is None else work
    fp16 = T4_FP16_TFLOPS * 1e12 * T4_EFFICIENCY[1]
    vae = (T4_FP32_TFLOPS if plan.vae_fp32 else T4_FP16_TFLOPS) * 1e12 * T4_EFFICIENCY[1]
    dequant = dequant_seconds(plan)
    optimizer = plan.step.trained / 4 * OPTIMIZER_BYTES_PER_VALUE / T4_BANDWIDTH
    step = plan.step.flops / fp16 + dequant_passes(cfg) * dequant + optimizer
    call = flops["unet_guidance"] / fp16  # one sampler step of one image: a batch-2 UNet call
    encode, decode = flops["vae_encode"] / vae, flops["vae_decode"] / vae
    class_calls = math.ceil(work.class_images / work.class_batch) * work.class_steps
    phases = {"class images": work.class_images * (work.class_steps * call + decode) + class_calls * dequant,
              "latent cache": work.encodes * encode,
              "training steps": work.steps * step,
              "validation": work.validation_calls * (call + dequant) + work.validation_images * decode}
    return Timing(step, phases)


@dataclass
class Search:
    """What a recipe search found for a card of `gb` GB."""

    gb: float
    plans: list[MemoryPlan]  # every recipe: its whole run where its step fits, else its step alone
    chosen: MemoryPlan | None  # the fastest whose whole run fits
    defaults: object  # the TrainConfig the run would have without --gpu-memory (presets filled)
    without_text: Search | None = None  # asked to train the text encoders, nothing fit: without them

    def changes(self) -> dict:
        """The settings the chosen recipe changes: name -> value."""
        return {name: getattr(self.chosen.cfg, name) for name in OPTIONS
                if getattr(self.chosen.cfg, name) != getattr(self.defaults, name)}

    def closest(self) -> MemoryPlan:
        """The recipe predicted to need the least memory (whole runs before lone steps)."""
        return min(self.plans, key=lambda p: (not p.phases, p.predicted))


def search(cfg, gb: float, explicit=(), runs: dict | None = None) -> Search:
    """Plan every recipe for `cfg` on a card of `gb` GB; `explicit`: the settings the user passed
    (kept as they are). `runs` keeps the fake runs for another search of the same run."""
    if not 0 < gb < 10_000:
        raise TrainingError(f"--gpu-memory {gb}: give the GPU's memory in GB, e.g. 8")
    runs = {} if runs is None else runs
    options = {name: (getattr(cfg, name),) if name in explicit else values for name, values in OPTIONS.items()}
    if cfg.method != "lora":  # full fine-tuning trains the UNet's weights: they stay unquantised
        options["base_weights"] = ("fp16",)
    plans = []
    for values in itertools.product(*options.values()):
        recipe = replace(cfg, **dict(zip(options, values)))
        plan = plan_training(recipe, runs, with_phases=False)  # the step first: most recipes stop there
        plan.usable_gib, plan.card = usable_gib(gb), f"{gb:g} GB GPU"
        if plan.fits:
            plan = plan_training(recipe, runs)
            plan.usable_gib, plan.card = usable_gib(gb), f"{gb:g} GB GPU"
        plans.append(plan)
    fitting = [p for p in plans if p.fits and p.phases]
    chosen = min(fitting, key=lambda p: estimate_time(p).run_s) if fitting else None
    found = Search(gb, plans, chosen, plan_training(cfg, runs, with_phases=False).cfg)
    if chosen is None and cfg.train_text_encoder:
        found.without_text = search(replace(cfg, train_text_encoder=False), gb, explicit, runs)
    return found


def recipe_row(plan: MemoryPlan) -> str:
    """One line of the search's table: the recipe, its predicted GiB, its estimated time."""
    cfg, timing = plan.cfg, estimate_time(plan) if plan.phases else None
    whole = f"{plan.predicted / GiB:7.2f}" if plan.phases else f"{'-':>7}"
    speed = f"{timing.step_s:7.2f} {timing.run_s / 3600:5.1f}" if timing else f"{'-':>7} {'-':>5}"
    verdict = ("fits" if plan.fits else "too large") if plan.phases else "the step alone is too large"
    tiles = f"{cfg.vae_tiling} px" if cfg.vae_tiling else "off"
    return (f"  {'on' if cfg.gradient_checkpointing else 'off':<14}{cfg.base_weights:<6}{tiles:<10}"
            f"{step_gib(plan):8.2f} {whole} {speed}  {verdict}")


def step_gib(plan: MemoryPlan) -> float:
    """The training step's predicted GiB (its allocated peak + the margin)."""
    return MemoryPlan(plan.title, plan.step, {}).predicted / GiB


def format_search(found: Search) -> str:
    """The search as `train.py --plan --gpu-memory N` prints it: every recipe, then the chosen
    one's plan, or what comes closest and what it would need."""
    usable = usable_gib(found.gb)
    lines = [f"--gpu-memory {found.gb:g}: {usable:.2f} GiB usable (N GB x 15/16, the T4's rule: 16 GB -> "
             f"{T4_USABLE_GIB} GiB); every figure below is predicted (fake tensors, no GPU)", "",
             "  checkpointing base  VAE tiles step GiB run GiB  s/step run h  (GiB: predicted peak + "
             "margin; time: estimated at assumed T4 rates)"]
    ranked = sorted(found.plans, key=lambda p: (not (p.fits and p.phases), estimate_time(p).run_s
                                                if p.phases else math.inf, p.predicted))
    lines += [recipe_row(plan) for plan in ranked]
    if found.chosen is not None:
        timing = estimate_time(found.chosen)
        lines += ["", f"chosen, the fastest that fits: {recipe_flags(found.chosen.cfg)} (predicted "
                  f"{found.chosen.predicted / GiB:.2f} GiB for the whole run; est. {timing.step_s:.1f} s/step, "
                  f"{timing.run_s / 3600:.1f} h for the whole run)", "", format_plan(found.chosen)]
        return "\n".join(lines)
    lines += ["", nothing_fits(found)]
    if found.without_text is not None and found.without_text.chosen is not None:
        lines += ["", f"--train-text-encoder must be off to fit: without it, {recipe_flags(found.without_text.chosen.cfg)}"
                  f" is predicted at {found.without_text.chosen.predicted / GiB:.2f} GiB", "",
                  format_plan(found.without_text.chosen)]
    return "\n".join(lines)


def nothing_fits(found: Search) -> str:
    """What comes closest when no recipe fits, and what would be needed."""
    plan = found.closest()
    need = plan.predicted / GiB
    what = "the whole run" if plan.phases else "the training step alone"
    name = plan.worst()[0]
    return (f"nothing is predicted to fit {found.gb:g} GB ({usable_gib(found.gb):.2f} GiB usable). Closest: "
            f"{recipe_flags(plan.cfg)}, {what} predicted at {need:.2f} GiB (largest: {name}): it needs a "
            f"card of {math.ceil(need * 16 / T4_USABLE_GIB)} GB or more, or less memory: a lower --resolution "
            "(every phase), --no-prior (no class-image phases), --no-train-text-encoder, --vae with an "
            "fp16-fix VAE (the VAE phases in fp16)")


def choose_recipe(cfg, explicit=()) -> tuple[dict, list[str]]:
    """The settings the recipe `search` chooses for cfg.gpu_memory changes (name -> value), and the
    lines that say so and what the user's flags kept. TrainingError when nothing is predicted to fit."""
    found = search(cfg, cfg.gpu_memory, explicit)
    if found.chosen is None:
        without = found.without_text
        if without is not None and without.chosen is not None:
            raise TrainingError(f"--gpu-memory {cfg.gpu_memory:g}: with --train-text-encoder nothing is predicted "
                                f"to fit; without it, {recipe_flags(without.chosen.cfg)} would: drop "
                                "--train-text-encoder (or --gpu-memory to run anyway)")
        raise TrainingError(f"--gpu-memory {cfg.gpu_memory:g}: {nothing_fits(found)}; drop --gpu-memory to "
                            "run anyway")
    changes = found.changes()
    timing = estimate_time(found.chosen)
    changed = ", ".join(as_flag(k, v) for k, v in changes.items()) or "nothing to change"
    lines = [f"--gpu-memory {cfg.gpu_memory:g}: {changed} (the fastest recipe predicted to fit: "
             f"{found.chosen.predicted / GiB:.2f} GiB of {usable_gib(cfg.gpu_memory):.2f} usable, "
             f"est. {timing.step_s:.1f} s/step on a T4-class card)"]
    kept = [as_flag(name, getattr(cfg, name)) for name in OPTIONS if name in explicit]
    if kept:
        lines.append(f"--gpu-memory {cfg.gpu_memory:g}: kept as you passed them: {', '.join(kept)}")
    return changes, lines
