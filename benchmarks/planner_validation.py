"""Does the T4 memory planner count right? Its fake-tensor accounting vs a real step's memory, on the CPU;
then the planner's T4 predictions for the runs README quotes.

    python -m benchmarks.planner_validation [--latent 96] [--threads 2] [--skip-validation] [--skip-plans]

No GPU here, so the planner's method is checked where the real thing can run: the CPU. For a
mid-size SDXL-shaped UNet (benchmarks/training_step.py's config) and a few settings (LoRA / full,
bf16 / fp32, checkpointing on / off), each in a fresh process:

- predicted: memory.plan_step on fake CPU tensors, the same function `train.py --plan` runs, with
  the CPU's rules instead of the T4's (CPU autocast policy, no 512-byte rounding);
- measured: the real step (step.training_step + step.apply_gradients, torch AdamW) on real tensors.
  The process first takes one step (optimizer states, lazily built kernels), then the kernel's
  peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs` zeroes VmHWM) and a second step runs;
  measured = VmHWM after it - VmRSS before it: the memory the step added at its worst moment.
  glibc is told to mmap every block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_=65536), so a freed
  tensor leaves RSS at once instead of staying in a malloc arena, as a freed block returns to
  torch's caching allocator on a GPU.

Compared: that increment against the planner's (its peak - the weights and optimizer states held
before the step). The weights themselves are left out of the comparison because they are easy:
counting them right would flatter the agreement.

Then `train.py --plan` for: the default SDXL LoRA recipe, the same with an fp16-fix VAE, with LoRA on
both text encoders, and full fine-tuning of SD 1.5, SD 2.1 and SDXL (configs/ holds their
config.json files), written to RESULTS.md as one table.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402

from benchmarks.harness import MID_TEXT, MID_UNET  # noqa: E402
from minidream.formats.checkpoint import build_unet  # noqa: E402
from minidream.config import TrainConfig  # noqa: E402
from minidream.methods.registry import build_method  # noqa: E402
from minidream.quant.linear import quantise_model  # noqa: E402
from minidream.optim import make_grad_scaler, make_optimizer, resolve_precision  # noqa: E402
from minidream.planner import memory, recipes, report  # noqa: E402
from minidream.schedule import alphas_cumprod as alphas_cumprod_of  # noqa: E402
from minidream.step import apply_gradients, training_step  # noqa: E402
from minidream.toy.tiny import clip_text_config  # noqa: E402

CASES = {  # name -> (method, precision, gradient checkpointing, base weights)
    "lora-bf16-ckpt": ("lora", "bf16", True, "fp16"),
    "lora-bf16": ("lora", "bf16", False, "fp16"),
    "lora-fp32": ("lora", "fp32", False, "fp16"),
    "full-bf16-ckpt": ("full", "bf16", True, "fp16"),
    "lora-bf16-ckpt-int8": ("lora", "bf16", True, "int8"),
    "lora-bf16-int8": ("lora", "bf16", False, "int8"),
    "lora-bf16-ckpt-nf4": ("lora", "bf16", True, "nf4"),
}
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the docstring
REPO = Path(__file__).resolve().parent.parent
SDXL = "configs/sdxl-base-1.0"
PLANS = [  # (what, train.py flags after --plan, TrainConfig settings)
    ("SDXL LoRA, default T4 recipe", "--model configs/sdxl-base-1.0", dict(model=SDXL)),
    ("SDXL LoRA, default recipe + an fp16-fix VAE", "--model configs/sdxl-base-1.0 --vae FP16_FIX_VAE",
     dict(model=SDXL, vae="fp16-fix")),
    ("SDXL LoRA on UNet + both text encoders", "--model configs/sdxl-base-1.0 --train-text-encoder",
     dict(model=SDXL, train_text_encoder=True)),
    ("SD 1.5 full fine-tuning (512 px)", "--model configs/sd-1.5 --method full",
     dict(model="configs/sd-1.5", method="full")),
    ("SD 2.1 full fine-tuning (768 px)", "--model configs/sd-2.1 --method full",
     dict(model="configs/sd-2.1", method="full")),
    ("SDXL full fine-tuning (1024 px)", "--model configs/sdxl-base-1.0 --method full", dict(model=SDXL, method="full")),
]


def mid_configs() -> dict:
    """The planner's configs for the mid-size model (text encoders: only their widths matter)."""
    return {"unet": MID_UNET, "vae": {"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 16,
                                      "down_block_types": ["DownEncoderBlock2D"] * 4,
                                      "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1},
            "text_encoder": clip_text_config(MID_TEXT[0], 2, "quick_gelu", 1000, False),
            "text_encoder_2": clip_text_config(MID_TEXT[1], 2, "gelu", 1000, True), "scheduler": {}}


def train_config(case: str, latent: int) -> TrainConfig:
    method, precision, ckpt, base = CASES[case]
    return TrainConfig(method=method, precision=precision, gradient_checkpointing=ckpt, resolution=8 * latent,
                       optimizer="adamw", rank=4, batch_size=1, prior=True, steps=2, lr=1e-4, base_weights=base,
                       lora_targets="attn", prior_weight=1.0)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(case: str, side: str, latent: int, threads: int) -> dict:
    """One measurement in this (fresh) process; returns the figures as a dict."""
    torch.set_num_threads(threads)
    cfg = train_config(case, latent)
    precision = resolve_precision(cfg.precision, "cpu")
    configs = mid_configs()
    model = memory.meta_model(configs, precision.weight_dtype, precision.weight_dtype, cfg.base_weights)
    if side == "predicted":
        method = build_method(model, cfg, "sks", "person")
        step = memory.plan_step(model, method, cfg, precision, memory.fake_tensors(), block=1, cuda=False)
        before = step.frozen + step.trained + step.optimizer_states
        return {"increment_mib": (step.peak - before) / 2**20, "weights_mib": (step.frozen + step.trained) / 2**20,
                "forward_backward_mib": (step.peak_forward_backward - before) / 2**20,
                "optimizer_mib": (step.peak_optimizer - before) / 2**20,
                "states_mib": step.optimizer_states / 2**20, "activations_mib": step.activations / 2**20}
    torch.manual_seed(0)
    model.unet = build_unet(configs["unet"]).to(precision.weight_dtype).requires_grad_(False)  # real weights
    quantise_model(model.unet, cfg.base_weights)  # as load_weights(quantise=...) does while reading
    method = build_method(model, cfg, "sks", "person")
    optimizer, _ = make_optimizer(method.param_groups(), cfg.optimizer, lr=cfg.lr)
    scaler = make_grad_scaler(precision)
    alphas_cumprod = alphas_cumprod_of(model.schedule)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, MID_UNET["cross_attention_dim"], generator=g)
    pooled = torch.randn(2, MID_TEXT[1], generator=g)

    def one_step():
        shape = (2, 4, latent, latent)
        batch = memory.fake_batch(2, 1, (latent, latent), True)  # shapes; values filled below
        batch.latents, batch.noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        batch.timesteps, batch.time_ids = torch.randint(0, 1000, (2,), generator=g), torch.full((2, 6), 1024.0)
        batch.prompt_index = torch.tensor([0, 1])
        training_step(model.unet, batch, lambda: (context, pooled), alphas_cumprod, autocast_dtype=precision.autocast_dtype,
                      scaler=scaler)
        apply_gradients(optimizer, method.parameters(), scaler, cfg.max_grad_norm)

    one_step()  # optimizer states, lazily initialised kernels
    gc.collect()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    one_step()
    return {"increment_mib": (rss_kib("VmHWM") - before) / 1024, "rss_before_mib": before / 1024}


def fp16_fix_vae(folder: Path) -> Path:
    """A VAE config like an fp16-fix SDXL VAE's: SDXL's architecture with force_upcast false."""
    config = json.loads((REPO / SDXL / "vae" / "config.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    return folder


def plans_section(info: dict) -> str:
    """`train.py --plan` for PLANS, as a RESULTS.md section."""
    rows, plans = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for what, flags, settings in PLANS:
            if settings.get("vae") == "fp16-fix":
                settings = {**settings, "vae": str(fp16_fix_vae(Path(tmp) / "vae"))}
            plan = memory.plan_training(TrainConfig(**{**settings, "model": str(REPO / settings["model"])}))
            plans[what] = plan
            s, (phase, _) = plan.step, plan.worst()
            step_total = s.peak + memory.margin(s.peak)
            verdict = "yes" if plan.fits else f"no, {plan.predicted / memory.GiB - memory.T4_USABLE_GIB:.1f} GiB over"
            rows.append([what, f"`{flags}`", f"{s.peak / memory.GiB:.2f}", f"{step_total / memory.GiB:.2f}",
                         phase, f"{plan.predicted / memory.GiB:.2f}", verdict,
                         f"{s.flops / 1e12:.1f}", f"{report.seconds_per_step(s.flops)[1]:.1f}"])
            print(rows[-1])
    table = harness.markdown_table(["run", "python train.py --plan ...", "step peak allocated GiB",
                                    "step predicted GiB", "largest phase of the run", "run predicted GiB",
                                    "fits a T4 (15.0 GiB)", "TFLOP / step", "est. s/step on a T4"], rows)
    return f"""## T4 memory plans (`train.py --plan`)

Command: `{harness.command_line()}` (each row is also `python train.py --plan` with the flags shown)

{harness.machine_lines(info)}

Every setting not shown is the T4 recipe: 1 subject + 1 class image per step, fp16 (autocast, loss
scaling), gradient checkpointing, 8-bit AdamW, cached latents and text, resolution = the model's
(SDXL 1024, SD 2.1 768, SD 1.5 512 px), LoRA rank 4, validation grids and class images generated on
the GPU. "step": one training step (forward + backward, or the optimizer step if larger), run on fake
tensors under CUDA's autocast policy; "allocated" = what torch.cuda.max_memory_allocated would report;
"predicted" adds the stated margin (0.6 GiB CUDA context and workspaces + 10% allocator
fragmentation: assumptions). "run": the largest phase of the whole run, including the latent cache (VAE
encode), class images and validation grids (UNet with guidance, VAE decode) with every model part on
the GPU, as train.py does. FP16_FIX_VAE: a VAE folder whose config says force_upcast false (e.g.
madebyollin/sdxl-vae-fp16-fix); here a copy of SDXL's VAE config with that flag. Attention: SDPA's
memory-efficient kernel on a T4 (never the L x L scores; the fake run used the fused CPU flash kernel,
which keeps the same tensors). s/step: FLOPs / (30% of the T4's 65 TFLOP/s fp16 peak), an assumption.

{table}

{plans_summary(plans)}
"""


def plans_summary(plans: dict) -> str:
    """The plans in two sentences: the default recipe's prediction, and which full fine-tunings fit."""
    gib = memory.GiB
    default, fp16_vae = plans[PLANS[0][0]], plans[PLANS[1][0]]
    step = default.step.peak + memory.margin(default.step.peak)
    full = [f"{what.split(' full')[0]} {'fits' if plan.fits else 'does not fit'} a T4"
            for what, plan in plans.items() if "full fine-tuning" in what]
    return (f"Summary: the default recipe's step is predicted at {step / gib:.2f} GiB and the whole run at "
            f"{default.predicted / gib:.2f} GiB ({fp16_vae.predicted / gib:.2f} GiB with an fp16-fix VAE). "
            f"Full fine-tuning: {', '.join(full)}.")


CARDS = (6, 8, 10, 12, 16, 24)  # GB


def cards_section(info: dict) -> str:
    """`train.py --plan --gpu-memory N` for CARDS (the default SDXL recipe otherwise), as a section."""
    cfg, runs, rows = TrainConfig(model=str(REPO / SDXL)), {}, []
    for gb in CARDS:
        found = recipes.search(cfg, gb, runs=runs)
        plan = found.chosen or found.closest()
        name, _ = plan.worst()
        timing = recipes.estimate_time(plan) if plan.phases else None
        rows.append([f"{gb} GB ({recipes.usable_gib(gb):.2f} GiB usable)",
                     f"`{recipes.recipe_flags(plan.cfg)}`" + ("" if found.chosen else " (closest; does not fit)"),
                     name, f"{plan.predicted / memory.GiB:.2f}", f"{recipes.step_gib(plan):.2f}",
                     f"{timing.step_s:.2f}" if timing else "-", f"{timing.run_s / 3600:.1f}" if timing else "-"])
        print(rows[-1])
    table = harness.markdown_table(["card", "chosen recipe", "largest phase", "whole run predicted GiB",
                                    "step predicted GiB", "est. s/step", "est. whole run h"], rows)
    return f"""## Recipes per GPU size (`train.py --plan --gpu-memory N`)

Command: `{harness.command_line()}` (each row is also `python train.py --plan --gpu-memory N`)

{harness.machine_lines(info)}

Predicted, never measured on a GPU. SDXL base 1.0 (configs/), the default recipe otherwise: LoRA rank
4 on the attention, 1024 px, 1 subject + 1 class image per step, fp16 autocast, 8-bit AdamW, 200 class
images generated, validation every 250 of 1000 steps. For each card, minidream/planner/recipes.py
plans all 18 recipes (gradient checkpointing on/off x --base-weights fp16/int8/nf4 x --vae-tiling
0/512/256) on fake tensors and picks the fastest whose whole run (largest phase + the planner's
margin: 0.6 GiB + 10%) fits the card's usable memory, N x 15/16 GiB (a 16 GB T4 offers 15.0 GiB).
Time: estimates at assumed T4 rates (30% of 65 TFLOP/s fp16, 8.1 TFLOP/s fp32 for the fp32 VAE,
dequantisation as bytes moved at 320 GB/s); the whole run adds the 200 class images, the latent
cache's encodes (10 photos assumed) and 5 validation grids of 12 images to 1000 steps.

{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=96, help="latent side (image side / 8) [%(default)s]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--skip-validation", action="store_true")
    parser.add_argument("--skip-plans", action="store_true")
    parser.add_argument("--skip-cards", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.latent, args.threads)))
        return
    info = harness.machine(args.threads)
    print(harness.machine_lines(info))
    if not args.skip_validation:
        body = validation_section(args, info)
        if not args.no_write:
            harness.write_section("planner-validation", body)
    if not args.skip_plans:
        body = plans_section(info)
        print(body)
        if not args.no_write:
            harness.write_section("t4-plans", body)
    if not args.skip_cards:
        body = cards_section(info)
        print(body)
        if not args.no_write:
            harness.write_section("gpu-recipes", body)
    if not args.no_write:
        print(f"wrote {harness.RESULTS}")


def validation_section(args, info: dict) -> str:
    """Run CASES (predicted and measured, each in a fresh process); the RESULTS.md section."""
    rows, verdicts = [], []
    for case in args.cases:
        figures = {side: harness.run_child(["-m", "benchmarks.planner_validation", "--latent", str(args.latent),
                                            "--threads", str(args.threads), "--child", case, side], env=ENV)
                   for side in ("predicted", "measured")}
        p, m = figures["predicted"], figures["measured"]
        error = p["increment_mib"] / m["increment_mib"] - 1
        rows.append([case, f"{p['weights_mib']:.0f}", f"{p['states_mib']:.0f}", f"{p['forward_backward_mib']:.0f}",
                     f"{p['optimizer_mib']:.0f}", f"{p['increment_mib']:.0f}", f"{m['increment_mib']:.0f}",
                     f"{error:+.1%}"])
        verdicts.append(f"- {case}: {error:+.1%}")
        print(rows[-1], verdicts[-1])
    headers = ["case", "weights MiB", "optimizer states MiB", "predicted: forward + backward MiB",
               "predicted: optimizer step MiB", "predicted step increment MiB", "measured step increment MiB",
               "error"]
    table = harness.markdown_table(headers, rows)
    print(table)
    return f"""## Planner validation: fake-tensor accounting vs a real step's memory (CPU)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Model: the mid-size SDXL-shaped UNet of benchmark a (channels {MID_UNET['block_out_channels']},
transformer depth (0, 2, 4), 64-wide heads, context {MID_UNET['cross_attention_dim']}, text_time conditioning),
random weights, LoRA rank 4 on to_q/to_k/to_v/to_out.0 or every weight (full), {args.latent} x {args.latent}
latents, 1 instance + 1 class row, cached text, torch AdamW. Cases ending in -int8 / -nf4: the UNet's
Linear weights quantised as `--base-weights` quantises them (QuantLinear codes + scales, dequantised
layer by layer in forward and again in backward): predicted on memory.meta_model's quantised meta
UNet, measured on the real quantised one. Each side runs in a fresh process:
"predicted" is `memory.plan_step` on fake CPU tensors (what `train.py --plan` runs, with the CPU's
autocast policy and no 512-byte rounding); "measured" is the real step (training_step +
apply_gradients, after one warm-up step): VmHWM after the step - VmRSS before it, VmHWM reset just
before the step via /proc/self/clear_refs, glibc mmapping every block >= 64 KiB
(MALLOC_MMAP_THRESHOLD_=65536) so freed tensors leave RSS. Compared: the memory the step adds on
top of the weights and optimizer states it starts with (listed, not compared); the planner's
increment is the larger of its forward + backward and optimizer-step increments.

{table}

Summary (predicted / measured - 1):
{chr(10).join(verdicts)}
"""


if __name__ == "__main__":
    main()
