"""Benchmark a: one LoRA training step, minidream vs diffusers UNet2DConditionModel + peft.

    python -m benchmarks.training_step [--repeats 5] [--dtypes fp32 bf16] [--latent 64]

A mid-size SDXL-shaped UNet (channels (64, 128, 256), transformer depth (0, 2, 4), 64-wide heads,
text_time conditioning) with random weights, the same on both sides (minidream's state dict loads
into diffusers' model: same keys). LoRA rank 4, alpha 4 on to_q, to_k, to_v, to_out.0 (the targets
of diffusers' SDXL DreamBooth LoRA script), the same initial values on both sides. One step is what
each library's DreamBooth training does per optimizer step, with prior preservation (batch of 2:
one instance row, one class row, cached text embeddings):

    minidream  step.training_step (noise, UNet, eq. 2 loss, backward) + step.apply_gradients
               (clip to norm 1, torch AdamW step, zero_grad)
    diffusers  the loop body of examples/dreambooth/train_dreambooth_lora_sdxl.py: add_noise,
               UNet2DConditionModel(...) with peft LoRA (`unet.add_adapter(LoraConfig(...))`), chunked
               instance / prior MSE, backward, clip_grad_norm_(1.0), torch AdamW step, zero_grad

in fp32, and in bf16 (frozen weights bf16, LoRA fp32, torch.autocast bf16, as that script runs
with mixed precision), each with and without gradient checkpointing. Same protocol as every
benchmark (harness.py): one process, warm-up, interleaved repeats, medians, paired ratios. The
warm-up steps start both sides from the same state and show they compute the same loss and update.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import harness
from benchmarks.harness import MID_TEXT, MID_UNET

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minidream.lora import inject_lora, mark_only_lora_trainable  # noqa: E402
from minidream.schedule import ScheduleConfig, alphas_cumprod as alphas_cumprod_of  # noqa: E402
from minidream.step import Batch, apply_gradients, training_step  # noqa: E402
from minidream.unet import UNet, UNetConfig  # noqa: E402

THREADS = 2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, LR, MAX_NORM = 4, 1e-4, 1.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(latent: int, seed: int = 0, context_dim: int = sum(MID_TEXT), pooled_dim: int = MID_TEXT[1]) -> dict:
    """One prior-preservation batch (row 0 instance, row 1 class) and the cached prompt table."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, latent, latent)
    return dict(latents=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
                timesteps=torch.tensor([250, 750]), time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2),
                context=torch.randn(2, 77, context_dim, generator=g), pooled=torch.randn(2, pooled_dim, generator=g))


def build_pair(dtype: torch.dtype, checkpointing: bool, seed: int = 0):
    """(minidream UNet with LoRA, diffusers UNet with peft LoRA): same weights, same adapters."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    ours = UNet(UNetConfig.from_dict(MID_UNET))
    ref = UNet2DConditionModel(**MID_UNET)
    ref.load_state_dict(ours.state_dict())
    for model in (ours, ref):
        model.to(dtype).requires_grad_(False).train()
    inject_lora(ours, TARGETS, rank=RANK, alpha=RANK)
    mark_only_lora_trainable(ours)
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():  # B random too (not 0), so that every adapter gets gradients from the first step
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                # fp32 adapters, as the script's cast_training_params(unet, torch.float32) makes them
                peft_name = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                ref_params[peft_name].data = p.detach().clone().float()
    ours.enable_gradient_checkpointing(checkpointing)
    if checkpointing:
        ref.enable_gradient_checkpointing()
    return ours, ref


def minidream_step(unet, optimizer, params, inputs, autocast_dtype, scaler=None):
    """step() -> loss: minidream's training_step + apply_gradients on one prior-preservation batch, on the
    inputs' device; `scaler` an fp16 GradScaler (None: a disabled one)."""
    device = inputs["latents"].device
    alphas_cumprod = alphas_cumprod_of(ScheduleConfig()).to(device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    batch = Batch(inputs["latents"], inputs["noise"], inputs["timesteps"], inputs["time_ids"],
                  torch.tensor([0, 1], device=device), num_instance=1)
    context, pooled = inputs["context"], inputs["pooled"]

    def step():
        losses = training_step(unet, batch, lambda: (context, pooled), alphas_cumprod, autocast_dtype=autocast_dtype,
                               scaler=scaler)
        apply_gradients(optimizer, params, scaler, MAX_NORM)
        return losses.loss

    return step


def diffusers_step(unet, optimizer, params, inputs, autocast_dtype, scaler=None):
    """The loop body of diffusers' train_dreambooth_lora_sdxl.py (prior preservation, cached text); with an
    fp16 `scaler` the loss scaling accelerate adds around it."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1)
    device = inputs["latents"].device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)

    def step():
        latents, noise, t = inputs["latents"], inputs["noise"], inputs["timesteps"]
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            pred = unet(noisy, t, inputs["context"], added_cond_kwargs={"text_embeds": inputs["pooled"],
                        "time_ids": inputs["time_ids"]}, return_dict=False)[0]
        pred, prior_pred = torch.chunk(pred, 2, dim=0)
        target, prior_target = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(pred.float(), target.float()) + F.mse_loss(prior_pred.float(), prior_target.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_steps(dtype_name: str, checkpointing: bool, inputs: dict):
    """{"minidream": step(), "diffusers": step()} on fresh models, and the models' LoRA parameter lists."""
    dtype = DTYPES[dtype_name]
    autocast = None if dtype == torch.float32 else dtype
    ours, ref = build_pair(dtype, checkpointing)
    sides = {}
    for name, unet, make in (("minidream", ours, minidream_step), ("diffusers", ref, diffusers_step)):
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
        sides[name] = (make(unet, optimizer, params, inputs, autocast), unet)
    return sides


def warm_up_and_compare(sides: dict) -> tuple[float, float]:
    """The warm-up: one step of each side from the same start. Returns (loss rel. diff, max rel. diff of
    the updated LoRA weights): both sides computed the same step."""
    loss_a, loss_b = sides["minidream"][0](), sides["diffusers"][0]()
    ref = dict(sides["diffusers"][1].named_parameters())
    diffs = [((p - ref[n + ".weight"]).abs().max() / ref[n + ".weight"].abs().max()).item()
             for n, p in sides["minidream"][1].named_parameters() if ".lora_" in n]
    return abs(loss_a.item() - loss_b.item()) / abs(loss_b.item()), max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--latent", type=int, default=64, help="latent side [%(default)s] (image side / 8)")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.latent)
    info = harness.machine(args.threads)
    print(harness.machine_lines(info))
    rows, verdicts = [], []
    for dtype_name in args.dtypes:
        for ckpt in args.checkpointing:
            steps = make_steps(dtype_name, ckpt == "on", inputs)

            def case(step):
                def run():
                    start, cpu = time.perf_counter(), time.process_time()
                    step()
                    return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}

                return run

            print(f"{dtype_name}, checkpointing {ckpt}: warm-up (one step per side, compared)")
            loss_diff, lora_diff = warm_up_and_compare(steps)
            runs = harness.interleave({name: case(s) for name, (s, _) in steps.items()}, args.repeats, warmup=0)
            ours, ref = runs["minidream"], runs["diffusers"]
            ratio, cpu_ratio = harness.paired_ratio(ours, ref, "s"), harness.paired_ratio(ours, ref, "cpu_s")
            rows.append([dtype_name, ckpt, harness.median(ours, "s"), harness.spread(ours, "s"),
                         harness.median(ref, "s"), harness.spread(ref, "s"), f"{ratio:.2f}", f"{cpu_ratio:.2f}",
                         f"{loss_diff:.1e}", f"{lora_diff:.1e}"])
            verdicts.append(f"- {dtype_name}, checkpointing {ckpt}: ratio {ratio:.2f} ({harness.speed_words(ratio)})")
            print(rows[-1])
    headers = ["dtype", "checkpointing", "minidream s", "min..max", "diffusers s", "min..max", "ratio (wall)",
               "ratio (CPU time)", "loss rel. diff", "updated LoRA rel. diff"]
    table = harness.markdown_table(headers, rows)
    print(table)
    print("\n".join(verdicts))
    if args.no_write:
        return
    body = f"""## a. LoRA training step, mid-size SDXL-shaped UNet (CPU)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Config: UNet block_out_channels {MID_UNET['block_out_channels']}, transformer depth (0, 2, 4), heads
{MID_UNET['attention_head_dim']} (64 wide), context {MID_UNET['cross_attention_dim']}, text_time conditioning, random
weights shared by both sides; LoRA rank {RANK}, alpha {RANK} on {', '.join(TARGETS)} (same initial values);
{args.latent} x {args.latent} latents, batch 2 (1 instance + 1 class row, DreamBooth eq. 2 with prior weight 1),
cached text embeddings. One step = noise + forward + loss + backward + clip to norm {MAX_NORM} + torch AdamW
(lr {LR}) + zero_grad: minidream `step.training_step` + `step.apply_gradients`; diffusers the loop body of
`train_dreambooth_lora_sdxl.py` (`UNet2DConditionModel` + peft `add_adapter`). bf16: frozen weights bf16,
LoRA fp32, `torch.autocast("cpu", bfloat16)` on both. `torch.set_num_threads({args.threads})`, one process,
one warm-up step per side, then medians of {args.repeats} interleaved repeats; ratio = median of per-round
ratios minidream / diffusers; "ratio (CPU time)" uses the process CPU time (less sensitive to other jobs).
"rel. diff" columns: the warm-up steps, taken by both sides from the same start (loss, and
max |a - b| / max |b| of the updated LoRA weights).

{table}

Summary (ratio minidream / diffusers, wall time):
{chr(10).join(verdicts)}
"""
    harness.write_section("a-training-step", body)
    print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
