"""The GPU check: minidream's default T4 recipe on a full-size SDXL UNet with random fp16 weights.

    python -m benchmarks.gpu_check                        # a CUDA GPU: full-size SDXL at 1024 px, a few minutes
    python -m benchmarks.gpu_check --device cpu --small   # the same code on the bundled tiny model's shapes
    ... --base-weights fp16 int8 nf4                      # also the 8 and 6 GB recipes (quantised base)
    ... --write                                           # also put the report into benchmarks/RESULTS.md

Nothing is downloaded: the UNet is built from configs/sdxl-base-1.0/unet/config.json (--small: the
bundled weights/tiny-sdxl's config) with N(0, 0.02) weights, on the device. The recipe is train.py's
for a 16 GB T4: LoRA rank 4 on the attention projections (fp32 adapters on fp16 weights), fp16
autocast with a GradScaler, gradient checkpointing, bitsandbytes AdamW8bit, cached latents and text
(random stand-ins of the cache's shapes), a prior-preservation batch (1 instance + 1 class row).

Reported: one warm-up step and `--steps` measured steps (s/step, torch.cuda.max_memory_allocated),
the same steps with diffusers + peft where installed (the loop body of diffusers' DreamBooth LoRA
script, benchmarks/training_step.py; ratio minidream / diffusers), one 30-step DDIM sample with
guidance at the training resolution plus its VAE decode (s/image), and the memory planner's
prediction of the step's peak (minidream.planner.memory) next to the measured peak (error %).
Then, for the T4 recipe and each --base-weights recipe (int8 / nf4 with 512 px VAE tiles: what
`train.py --gpu-memory 8 / 6` chooses), the run's other phases (VAE encode, a UNet call with
guidance, VAE decode) with the whole model on the device as train.py loads it, next to the plan.

Checks (exit 1 if one fails): the GradScaler was enabled and its scale finite, every loss finite,
the LoRA weights changed, the optimizer is AdamW8bit with 8-bit (uint8) moment states.
On a CPU, fp16 autocast runs too (slowly), so the same path is exercised; there is no allocator
peak to compare with the planner there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks import harness

harness.passive_waiting()
import torch  # noqa: E402

from benchmarks.full_step import fill  # noqa: E402
from benchmarks.training_step import diffusers_step, make_inputs, minidream_step  # noqa: E402
from minidream import pipeline, samplers  # noqa: E402
from minidream.formats.checkpoint import build_unet, build_vae  # noqa: E402
from minidream.config import TrainConfig  # noqa: E402
from minidream.lora import inject_lora, lora_parameters, mark_only_lora_trainable, unet_targets  # noqa: E402
from minidream.optim import BNB_MIN_8BIT_SIZE, make_optimizer  # noqa: E402
from minidream.planner import memory  # noqa: E402
from minidream.quant.linear import quantise_model  # noqa: E402
from minidream.schedule import ScheduleConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FULL, SMALL = REPO / "configs" / "sdxl-base-1.0", REPO / "weights" / "tiny-sdxl"
RANK, LR, TARGETS = 4, 1e-4, unet_targets("attn")
GiB = 2**30


def on_device(module: torch.nn.Module, device) -> torch.nn.Module:
    """A module built on meta, given fp16 storage on `device` and random values (the UNets and the VAE have
    no buffers: parameters are all there is to fill)."""
    module = module.to(torch.float16).to_empty(device=device).requires_grad_(False)
    fill(module.named_parameters())
    return module


def pooled_dim(config: dict) -> int:
    """Width of the pooled text embedding an SDXL UNet config expects (its added input minus 6 time ids)."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def build_minidream(config: dict, device, rank: int, base_weights: str = "fp16"):
    """minidream's UNet, fp16 (its Linears quantised as --base-weights int8 / nf4 has them), with fp32
    LoRA adapters (B = 0 as train.py starts), checkpointing on."""
    with torch.device("meta"):
        unet = build_unet(config)
    unet = on_device(unet, device)
    quantise_model(unet, base_weights)
    inject_lora(unet, TARGETS, rank=rank, alpha=rank)  # adapters are made on the weights' device
    mark_only_lora_trainable(unet)
    unet.enable_gradient_checkpointing(True)
    return unet.train(), lora_parameters(unet)


def build_diffusers(config: dict, device, rank: int):
    """diffusers' UNet2DConditionModel, fp16, with peft LoRA in fp32 (the script's cast_training_params)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = on_device(unet, device)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    for p in params:
        p.data = p.data.float()
    unet.enable_gradient_checkpointing()
    return unet.train(), params


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_training(side: str, config: dict, inputs: dict, args, base_weights: str = "fp16") -> dict:
    """Warm-up + `steps` timed steps of one library; the checks' evidence from the minidream side."""
    device, cuda = args.device, torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if side == "minidream":
        unet, params = build_minidream(config, device, args.rank, base_weights)
    else:
        unet, params = build_diffusers(config, device, args.rank)
    optimizer, optimizer_name = make_optimizer([{"params": params}], "adamw8bit", lr=args.lr)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=True)
    before = [p.detach().clone() for p in params]
    step = (minidream_step if side == "minidream" else diffusers_step)(unet, optimizer, params, inputs,
                                                                       torch.float16, scaler)
    losses, times = [], []
    for _ in range(args.steps + 1):  # the first is the warm-up
        sync(device)
        start = time.perf_counter()
        losses.append(float(step()))
        sync(device)
        times.append(time.perf_counter() - start)
    big = [p for p in params if p.numel() >= BNB_MIN_8BIT_SIZE]  # bitsandbytes keeps smaller ones' moments fp32
    result = dict(s_per_step=statistics.median(times[1:]), warmup_s=times[0], losses=losses,
                  peak_gib=torch.cuda.max_memory_allocated() / GiB if cuda else None, optimizer=optimizer_name,
                  scale=scaler.get_scale(), scaler_enabled=scaler.is_enabled(),
                  big_params=len(big), big_params_8bit=sum(any(torch.is_tensor(v) and v.dtype == torch.uint8
                                                               for v in optimizer.state[p].values()) for p in big),
                  lora_change=max(float((p.detach() - b).abs().max()) for p, b in zip(params, before)))
    return result | {"unet": unet}


def measure_sampling(unet, config: dict, vae_config: dict, latent: int, device, steps: int = 30) -> float:
    """Seconds for one image: `steps` DDIM steps with guidance 5 (doubled batch) and the fp32 VAE decode."""
    unet.eval()
    context = torch.randn(2, 77, config["cross_attention_dim"], device=device)
    pooled = torch.randn(2, pooled_dim(config), device=device)
    side = 8 * latent
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32, device=device)
    with torch.device("meta"):
        vae = build_vae(vae_config)
    vae = on_device(vae, device).float()
    denoiser = samplers.with_guidance(pipeline.unet_closure(SimpleNamespace(unet=unet), context, pooled, time_ids), 5.0)
    x = torch.randn(1, 4, latent, latent, device=device)
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        latents = samplers.ddim(denoiser, x, ScheduleConfig(), steps)
        vae.decode(latents / vae_config.get("scaling_factor", 0.13025))
        sync(device)
    return time.perf_counter() - start


def planned_peak_gib(model_dir: Path, resolution: int, rank: int, base_weights: str = "fp16") -> float:
    """The planner's peak of the training step for this recipe (fake tensors: no memory, no compute)."""
    cfg = TrainConfig(model=str(model_dir), resolution=resolution, rank=rank, lr=LR, precision="fp16",
                      gradient_checkpointing=True, optimizer="adamw8bit", lora_targets="attn", prior_weight=1.0,
                      base_weights=base_weights)
    return memory.plan_training(cfg).step.peak / GiB


RECIPE_TILES = {"fp16": 0, "int8": 512, "nf4": 512}  # --vae-tiling of the 16 / 8 / 6 GB recipes (test_memory)
PHASES = {"vae_encode": "latent cache: VAE encode", "unet_guidance": "class images: UNet with guidance",
          "vae_decode": "class images: VAE decode"}  # memory.sampling_phases -> MemoryPlan.phases


def random_fill(module: torch.nn.Module) -> None:
    """Random values for a module given empty storage: floats N(0, 0.02), quantised codes any code,
    scales small (what they hold does not change the memory a phase takes)."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.dtype == torch.uint8:
                t.random_(0, 256)
            elif t.dtype == torch.int8:
                t.random_(-127, 128)
            elif name.endswith("weight_scales"):
                t.fill_(0.02 / 127)
            else:
                fill([(name, t)])


def measure_phases(model_dir: Path, args, base_weights: str) -> list[list[str]]:
    """The run's other phases for one recipe, measured on the device next to the planner: the model
    as train.py loads it (text encoders, the UNet quantised as `base_weights` says, the VAE tiled as
    the recipe's card needs; random weights), each phase of memory.sampling_phases run once."""
    tiles = RECIPE_TILES[base_weights] if not args.small else 32 * bool(RECIPE_TILES[base_weights])
    cfg = TrainConfig(model=str(model_dir), resolution=args.resolution, rank=args.rank, precision="fp16",
                      gradient_checkpointing=True, base_weights=base_weights, vae_tiling=tiles)
    planned = memory.plan_training(cfg).phases
    cuda = torch.device(args.device).type == "cuda"
    model = memory.meta_model(memory.read_configs(model_dir), torch.float16, torch.float16, base_weights, tiles)
    for module in memory.modules_of(model, vae=True):
        random_fill(module.to_empty(device=args.device))
    rows = []
    for name, run in memory.sampling_phases(model, args.resolution, args.device).items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            finite = bool(run().float().isfinite().all()) if name != "vae_encode" else True
        predicted = planned[PHASES[name]] / GiB
        measured = torch.cuda.max_memory_allocated() / GiB if cuda else None
        error = "" if measured is None else f"{(measured - predicted) / predicted * 100:+.1f}%"
        rows.append([f"{base_weights}, tiles {tiles or 'off'}", PHASES[name], f"{predicted:.3f}",
                     "n/a" if measured is None else f"{measured:.3f}", error, "yes" if finite else "NO"])
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows


def failed_checks(ours: dict) -> list[str]:
    """What did not hold of the fp16 + 8-bit path (empty: all did)."""
    checks = {
        "the GradScaler was enabled, with a finite scale": ours["scaler_enabled"] and 0 < ours["scale"] < float("inf"),
        "every loss is finite": all(map(math.isfinite, ours["losses"])),
        "the LoRA weights changed": ours["lora_change"] > 0,
        "the optimizer is AdamW8bit, with uint8 moments for every LoRA tensor of 4096+ values":
            ours["optimizer"] == "adamw8bit" and 0 < ours["big_params"] == ours["big_params_8bit"],
    }
    return [name for name, ok in checks.items() if not ok]


def quantised_lines(args, others: dict, model_dir: Path) -> list[str]:
    """The step on an int8 / nf4 base (the 8 and 6 GB recipes' step): measured next to the planner."""
    lines = []
    for base, r in others.items():
        planned = planned_peak_gib(model_dir, args.resolution, args.rank, base)
        peak = "no CUDA allocator here" if r["peak_gib"] is None else f"measured {r['peak_gib']:.2f} GiB " \
            f"(error {(r['peak_gib'] - planned) / planned * 100:+.1f}%)"
        lines.append(f"- --base-weights {base}: {r['s_per_step']:.3f} s/step, last loss {r['losses'][-1]:.4f}; "
                     f"planner's predicted step peak {planned:.3f} GiB, {peak}")
    return lines


def report(args, ours: dict, ref: dict | None, sample_s: float, planned: float, device_name: str) -> str:
    """The markdown report: command, machine, table, checks."""
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)  # noqa: E731
    rows = [["minidream", fmt(ours["s_per_step"]), fmt(ours["peak_gib"]), fmt(ours["losses"][-1], ".4f")]]
    if ref is not None:
        rows.append(["diffusers + peft", fmt(ref["s_per_step"]), fmt(ref["peak_gib"]), fmt(ref["losses"][-1], ".4f")])
    machine = harness.machine_lines(harness.machine()) + f"; device {device_name}"
    lines = [f"Command: `{harness.command_line()}`", "", machine,
             "", f"Recipe: {'bundled tiny model config' if args.small else 'SDXL base 1.0 UNet'} with random fp16 "
             f"weights, {args.resolution} px, batch 1 instance + 1 class, LoRA rank {args.rank} on attention, "
             f"fp16 autocast + GradScaler, gradient checkpointing, AdamW8bit, cached latents and text; "
             f"1 warm-up + {args.steps} measured steps (median).", "",
             harness.markdown_table(["side", "s/step", "peak allocated GiB", "last loss"], rows), ""]
    if ref is not None:
        lines.append(f"- step time ratio minidream / diffusers: {ours['s_per_step'] / ref['s_per_step']:.2f}")
    else:
        lines.append("- diffusers + peft not installed: no reference step")
    if ours["peak_gib"] is not None:
        error = (ours["peak_gib"] - planned) / planned * 100
        lines.append(f"- planner's predicted step peak {planned:.2f} GiB, measured {ours['peak_gib']:.2f} GiB "
                     f"(error {error:+.1f}%)")
    else:
        lines.append(f"- planner's predicted step peak {planned:.3f} GiB (no CUDA allocator here to measure it)")
    lines.append(f"- one {args.resolution} px image, 30 DDIM steps with guidance + VAE decode: {sample_s:.2f} s")
    lines.append(f"- fp16 path: GradScaler scale {ours['scale']:.0f}; uint8 Adam moments for {ours['big_params_8bit']} "
                 f"of {ours['big_params']} LoRA tensors of 4096+ values; largest LoRA change {ours['lora_change']:.2e}")
    failed = failed_checks(ours)
    lines.append("- checks: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda", help="where to run: cuda, cuda:1, cpu [cuda]")
    parser.add_argument("--small", action="store_true", help="the bundled tiny model's UNet config at 64 px")
    parser.add_argument("--rank", type=int, help="LoRA rank [4; --small: 32, so that some adapters are big enough "
                        "for bitsandbytes' 8-bit states]")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps after the warm-up [3]")
    parser.add_argument("--lr", type=float, default=LR, help=f"learning rate [{LR}] (0 makes the LoRA check fail)")
    parser.add_argument("--write", action="store_true", help="put the report into benchmarks/RESULTS.md")
    parser.add_argument("--base-weights", nargs="+", default=["fp16"], choices=["fp16", "int8", "nf4"],
                        help="also run the step on these quantised bases (the 8 / 6 GB recipes' step) [fp16]")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "error: no CUDA GPU here: run this on a machine with one, or pass --device cpu --small\n")
    model_dir = SMALL if args.small else FULL
    config = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    args.resolution = 64 if args.small else 1024
    args.rank = args.rank or (32 if args.small else RANK)
    latent = args.resolution // 8
    inputs = {k: v.to(args.device) for k, v in make_inputs(latent, context_dim=config["cross_attention_dim"],
                                                           pooled_dim=pooled_dim(config)).items()}
    ours = measure_training("minidream", config, inputs, args)
    sample_s = measure_sampling(ours.pop("unet"), config, vae_config, latent, args.device)
    try:
        import diffusers, peft  # noqa: E401, F401  (test-only references)
    except ImportError:
        ref = None
    else:
        ref = measure_training("diffusers", config, inputs, args)
        ref.pop("unet")
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    others = {b: measure_training("minidream", config, inputs, args, b) for b in args.base_weights if b != "fp16"}
    for r in others.values():
        r.pop("unet")
    text = report(args, ours, ref, sample_s, planned_peak_gib(model_dir, args.resolution, args.rank), name)
    text = "\n".join([text, *quantised_lines(args, others, model_dir)])
    phases = [row for base in dict.fromkeys(["fp16", *args.base_weights]) for row in measure_phases(model_dir, args, base)]
    text += ("\n\nThe run's other phases, the whole model on the device as train.py loads it for each recipe "
             "(peak allocated GiB, weights included; no margin):\n\n" + harness.markdown_table(
                 ["recipe", "phase", "predicted", "measured", "error", "finite"], phases))
    print(text)
    if args.write:
        smoke = "" if args.device.startswith("cuda") else (
            "\n\nThis is the CPU smoke configuration (the test suite's): its times say nothing of a GPU.")
        harness.write_section("gpu-check", f"## GPU check ({name})\n\n{text}{smoke}")
    return 1 if failed_checks(ours) else 0


if __name__ == "__main__":
    raise SystemExit(main())
