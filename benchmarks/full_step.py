"""Benchmark d (slow): one LoRA training step of the full-size SDXL UNet at 512 px, bf16, on the CPU.

    python -m benchmarks.full_step [--rounds 3] [--steps 2] [--threads 2]

The real SDXL base UNet (configs/sdxl-base-1.0/unet/config.json, 2.567 B parameters) with
deterministic random bf16 weights (every tensor drawn from a generator seeded by its name, so both
libraries get the same values), LoRA rank 4 on to_q/to_k/to_v/to_out.0 (fp32, also seeded by
name), 64 x 64 latents (512 px), batch 2 (1 instance + 1 class row), cached text, torch.autocast
bf16, torch AdamW, no gradient checkpointing. One step per side as in benchmark a
(benchmarks/training_step.py): minidream `training_step` + `apply_gradients`, diffusers
`UNet2DConditionModel` + peft `add_adapter` with the loop body of train_dreambooth_lora_sdxl.py.

The bf16 UNet alone is 5.1 GB of RAM, so each side runs in its own process and the two are never
resident together: rounds of (minidream process, diffusers process), each process building its
model, taking a warm-up step, then `--steps` timed steps; medians over all timed steps.

Efficiency: the step's FLOPs are counted once on a fake-tensor run of minidream's step (no memory,
no compute) with torch.utils.flop_counter's formulas (fake_run.FLOP_FORMULAS, which adds the CPU
flash-attention ops; tests/test_memory.py checks the count equals FlopCounterMode's), and each
minidream process measures the bf16 GEMM throughput of this machine right after its timed steps
(a 2048 x 2048 x 2048 bf16 matmul, best of 5): achieved FLOP/s = FLOPs / step time, reported as a
fraction of that GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()
import torch  # noqa: E402

from benchmarks.training_step import MAX_NORM, TARGETS, diffusers_step, make_inputs, minidream_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UNET_CONFIG = REPO / "configs" / "sdxl-base-1.0" / "unet" / "config.json"
RANK, LR, LATENT = 4, 1e-4, 64


def fill(named_tensors, dtype=None) -> None:
    """Give every tensor N(0, 0.02) values from a generator seeded by its name (both sides alike), drawn on
    the tensor's device (a full-size UNet on a GPU fills in a moment)."""
    with torch.no_grad():
        for name, t in named_tensors:
            g = torch.Generator(t.device).manual_seed(zlib.crc32(name.encode()))
            t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32).mul_(0.02).to(t.dtype))


def build(side: str):
    """The bf16 SDXL UNet of one library with fp32 LoRA adapters; returns (unet, trained params).
    Each side imports its model code here: minidream.checkpoint loads transformers, which the
    diffusers child must not carry (each child reports its peak RSS)."""
    config = json.loads(UNET_CONFIG.read_text())
    if side == "minidream":
        from minidream.formats.checkpoint import build_unet
        from minidream.lora import inject_lora, lora_parameters, mark_only_lora_trainable

        with torch.device("meta"):
            unet = build_unet(config)
        unet = unet.to(torch.bfloat16).to_empty(device="cpu").requires_grad_(False)
        fill(unet.named_parameters())
        inject_lora(unet, TARGETS, rank=RANK, alpha=RANK)
        mark_only_lora_trainable(unet)
        params = lora_parameters(unet)
        fill((n, p) for n, p in unet.named_parameters() if ".lora_" in n)
    else:
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        unet = unet.to(torch.bfloat16).to_empty(device="cpu").requires_grad_(False)
        fill(unet.named_parameters())
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
        params = [p for n, p in unet.named_parameters() if ".lora_" in n]
        for p in params:
            p.data = p.data.float()  # fp32 adapters (the script's cast_training_params)
        # peft names end in ".weight": fill under minidream's names so both get the same values
        fill((n.removesuffix(".weight"), p) for n, p in unet.named_parameters() if ".lora_" in n)
    unet.train()
    return unet, params


def gemm_tflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's bf16 matmul throughput now: best of `repeats` n x n x n products."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def child(side: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    unet, params = build(side)
    built = time.perf_counter() - start
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
    inputs = make_inputs(LATENT, context_dim=2048, pooled_dim=1280)
    make = minidream_step if side == "minidream" else diffusers_step
    step = make(unet, optimizer, params, inputs, torch.bfloat16)
    times, losses = [], []
    for _ in range(steps + 1):  # the first is the warm-up
        start = time.perf_counter()
        losses.append(step().item())
        times.append(time.perf_counter() - start)
    out = {"build_s": built, "warmup_s": times[0], "step_s": times[1:], "first_loss": losses[0],
           "peak_rss_gib": harness.peak_rss_gib()}
    if side == "minidream":
        del unet, params, optimizer, step
        out["gemm_tflops"] = gemm_tflops()
    return out


def count_flops() -> int:
    """FLOPs of minidream's step: memory.plan_step runs it on fake tensors (the same code, no compute)
    and counts with torch.utils.flop_counter's formulas (fake_run.FLOP_FORMULAS). Imported here: the
    planner loads transformers and the training methods, which the measured child processes must not
    carry (their peak RSS is reported)."""
    from minidream.config import TrainConfig
    from minidream.methods.registry import build_method
    from minidream.optim import resolve_precision
    from minidream.planner import memory

    cfg = TrainConfig(model=str(UNET_CONFIG.parent.parent), resolution=8 * LATENT, precision="bf16", rank=RANK,
                      gradient_checkpointing=False, optimizer="adamw", steps=1, lr=LR)
    precision = resolve_precision("bf16", "cpu")
    model = memory.meta_model(memory.read_configs(cfg.model), precision.weight_dtype, precision.weight_dtype)
    method = build_method(model, cfg, "sks", "person")
    return memory.plan_step(model, method, cfg, precision, memory.fake_tensors(), block=1, cuda=False).flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after its warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=["minidream", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    info = harness.machine(args.threads)
    print(harness.machine_lines(info))
    flops = count_flops()
    print(f"minidream step: {flops / 1e12:.2f} TFLOP (torch.utils.flop_counter formulas, fake tensors)")
    runs = {"minidream": [], "diffusers": []}
    for r in range(args.rounds):
        for side in runs:
            figures = harness.run_child(["-m", "benchmarks.full_step", "--child", side, "--steps", str(args.steps),
                                         "--threads", str(args.threads)], timeout=1800)
            runs[side].append(figures)
            print(f"  round {r + 1}/{args.rounds}: {side}: " + ", ".join(
                f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in figures.items()))
    step_s = {side: [t for f in figs for t in f["step_s"]] for side, figs in runs.items()}
    ours = statistics.median(step_s["minidream"])
    ratios = [a / b for a, b in zip(step_s["minidream"], step_s["diffusers"])]
    ratio = statistics.median(ratios)
    gemm = statistics.median(f["gemm_tflops"] for f in runs["minidream"])
    achieved = flops / ours / 1e12
    same = all(abs(a["first_loss"] - b["first_loss"]) <= 1e-3 * abs(b["first_loss"])
               for a, b in zip(runs["minidream"], runs["diffusers"]))
    rows = [[side, statistics.median(step_s[side]), f"{min(step_s[side]):.1f}..{max(step_s[side]):.1f}",
             statistics.median(f["warmup_s"] for f in runs[side]),
             statistics.median(f["peak_rss_gib"] for f in runs[side]),
             f"{runs[side][0]['first_loss']:.6f}"] for side in runs]
    table = harness.markdown_table(["side", "step s (median)", "min..max", "warm-up step s", "peak RSS GiB",
                                    "first-step loss"], rows)
    summary = (f"ratio minidream / diffusers (median of paired steps): {ratio:.2f}\n"
               f"minidream: {flops / 1e12:.2f} TFLOP per step / {ours:.1f} s = {achieved * 1e3:.0f} GFLOP/s = "
               f"{achieved / gemm:.0%} of the {gemm * 1e3:.0f} GFLOP/s a bf16 2048^3 GEMM reaches on this machine "
               f"(same processes)\nsame first-step loss on both sides (within 1e-3 relative): "
               f"{'yes' if same else 'NO'}")
    print(table)
    print(summary)
    if args.no_write:
        return
    body = f"""## d. Full-size SDXL UNet LoRA training step, 512 px, bf16 (CPU; slow)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Config: SDXL base 1.0 UNet (configs/sdxl-base-1.0, 2.567 B parameters) with name-seeded random bf16
weights, LoRA rank {RANK} on {', '.join(TARGETS)} (fp32, name-seeded), {LATENT} x {LATENT} latents, batch 2
(1 instance + 1 class row), cached text, torch.autocast bf16, torch AdamW (lr {LR}), clip norm
{MAX_NORM}, no gradient checkpointing. Each side in its own process (never both resident), {args.rounds}
rounds of (minidream, diffusers), each process: build, one warm-up step, {args.steps} timed step(s).
Ratio: median over the paired timed steps. FLOPs: torch.utils.flop_counter's formulas over a
fake-tensor run of minidream's step; GEMM rate: best of 5 bf16 2048^3 matmuls in each minidream
process after its steps.

{table}

{summary}
"""
    harness.write_section("d-full-step", body)
    print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
