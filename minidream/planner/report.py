"""The plan as train.py --plan prints it, and the T4 time a step takes (rates assumed, not measured).

memory.py plans the bytes; this file turns a MemoryPlan into the table a user reads: the training
step's parts, every other phase, the verdict for the card, and the time per step from the step's
FLOPs at an assumed fraction of the T4's fp16 peak (plus the memory-bound optimizer step and, on a
quantised base, the dequantisations). recipes.py ranks recipes with the same rates.
"""

from __future__ import annotations

from minidream.planner.memory import GiB, MARGIN_FIXED_GIB, MARGIN_FRACTION, MemoryPlan, margin

T4_FP16_TFLOPS = 65.0  # T4 datasheet: fp16 tensor-core peak (fp32 accumulate)
T4_EFFICIENCY = (0.25, 0.30, 0.35)  # assumed fraction of that peak a training step sustains (low, mid, high)
T4_BANDWIDTH = 320e9  # bytes/s (datasheet): the optimizer step is memory-bound, not FLOP-bound
OPTIMIZER_BYTES_PER_VALUE = 24  # ~ unscale (read + write grad) + clip (read grad) + Adam (param, grad, moments)
ATTENTION_NOTE = ("a T4 (Turing, sm_75) has no FlashAttention-2: torch's SDPA runs its memory-efficient kernel, "
                  "which keeps the output and one logsumexp per query for backward and never materialises the "
                  "(B, heads, L, L) scores")
# bytes read + written per weight by one dequantisation (minidream/quant): int8: codes -> fp16 (1 + 2),
# x scales (2 + 2); nf4: two nibble ops (0.5 + 0.5 each), stack (1 + 1), int32 index (1 + 4),
# level lookup (4 + 2), x absmax (2 + 2). The matmul reads W as an fp16 base's would: not counted.
DEQUANT_BYTES = {"fp16": 0, "int8": 7, "nf4": 19}


def seconds_per_step(flops: int) -> list[float]:
    """Seconds per optimizer step at each assumed T4 efficiency (low, mid, high)."""
    return [flops / (T4_FP16_TFLOPS * 1e12 * e) for e in T4_EFFICIENCY]


def dequant_seconds(plan: MemoryPlan) -> float:
    """Seconds of one dequantisation of every quantised UNet layer: bytes moved at a T4's bandwidth
    (assumed: elementwise kernels are memory-bound; a lower bound, launch overheads left out)."""
    return plan.quantised_weights * DEQUANT_BYTES[plan.cfg.base_weights] / T4_BANDWIDTH


def dequant_passes(cfg) -> int:
    """Dequantisations of each layer per optimizer step: forward, backward (QuantMatmul), and the
    forward again that gradient checkpointing recomputes."""
    return (3 if cfg.gradient_checkpointing else 2) * cfg.grad_accum


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the table train.py --plan prints."""
    s = plan.step

    def row(name, allocated=None, text=""):
        if allocated is None:
            return f"  {name:<52}{text}"
        return f"  {name:<52}{allocated / GiB:6.2f}   {(allocated + margin(allocated)) / GiB:6.2f}"

    opt = "weights + states + all gradients" + (" + foreach temporaries" if s.optimizer_temp else "")
    lines = [f"{plan.card} memory plan: {plan.title}", *[f"note: {n}" for n in plan.notes], "",
             f"  {'training step':<52}   GiB  predicted",
             row("frozen weights", text=f"{s.frozen / GiB:6.2f}"),
             row("trained parameters (fp32)", text=f"{s.trained / GiB:6.2f}"),
             row("optimizer states (+ EMA)" if getattr(plan.cfg, "ema_decay", 0) else "optimizer states",
                 text=f"{s.optimizer_states / GiB:6.2f}"),
             row("gradients (fp32) written at the peak / all", text=f"{s.gradients_at_peak / GiB:6.2f} / "
                 f"{s.gradients / GiB:.2f}"),
             row("activations, saved tensors, temporaries at the peak", text=f"{s.activations / GiB:6.2f}"),
             row("= forward + backward peak", s.peak_forward_backward),
             row(f"optimizer step ({opt})", s.peak_optimizer), "",
             f"  {'other phases of the run (everything on the GPU)':<52}   GiB  predicted"]
    lines += [row(name, v) for name, v in plan.phases.items()]
    name, peak = plan.worst()
    card = ("an " if plan.card.startswith(("8", "11 ", "18 ")) else "a ") + plan.card
    spare = plan.usable_gib - plan.predicted / GiB
    verdict = (f"fits {card} ({plan.usable_gib:.2f} GiB usable), {spare:.1f} GiB to spare" if plan.fits
               else f"does NOT fit {card} ({plan.usable_gib:.2f} GiB usable): {-spare:.1f} GiB too much")
    low, mid, high = seconds_per_step(s.flops)
    optimizer_s = s.trained / 4 * OPTIMIZER_BYTES_PER_VALUE / T4_BANDWIDTH
    optimizer_note = f", + {optimizer_s:.2f} s for the memory-bound optimizer step" if optimizer_s >= 0.01 else ""
    if plan.quantised_weights:
        optimizer_note += (f", + {dequant_passes(plan.cfg) * dequant_seconds(plan):.2f} s to dequantise the "
                           f"{plan.cfg.base_weights} base {dequant_passes(plan.cfg)} times (bytes moved at "
                           f"{T4_BANDWIDTH / 1e9:.0f} GB/s: assumed)")
    lines += ["", f"GiB: bytes allocated at the peak (what torch.cuda.max_memory_allocated reports); predicted: + "
              f"{MARGIN_FIXED_GIB} GiB (assumed CUDA context, cuBLAS/cuDNN workspaces) + {MARGIN_FRACTION:.0%} "
              "(assumed allocator fragmentation)",
              f"largest: {name}, predicted {plan.predicted / GiB:.2f} GiB: {verdict}", "",
              f"attention: the fake run used SDPA's {', '.join(s.attention) or 'no SDPA kernel'}; {ATTENTION_NOTE}.",
              f"time: {s.flops / 1e12:.1f} TFLOP per optimizer step (forward, checkpoint recomputation, backward) "
              f"-> about {mid:.1f} s/step on a T4 at {T4_EFFICIENCY[1]:.0%} of its {T4_FP16_TFLOPS:.0f} TFLOP/s fp16 "
              f"peak ({high:.1f}..{low:.1f} s at {T4_EFFICIENCY[2]:.0%}..{T4_EFFICIENCY[0]:.0%}; an assumed "
              f"efficiency, not a measurement){optimizer_note}"]
    return "\n".join(lines)
