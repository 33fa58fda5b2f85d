"""Benchmark g: does torch.compile of the UNet pay for a minidream run on this CPU, compile included?

    python -m benchmarks.compile_step [--steps 5] [--images 4] [--quick] [--no-write]

Two models, the LoRA training step as train.py runs it on a CPU (fp32, one torch thread):

    tiny  the bundled model (weights/tiny-sdxl, 64 px, its real weights), set up as train.py does:
          TrainConfig + fill_defaults (the "tiny" preset: LoRA rank 4 on attn,ff,proj, lr 3e-3,
          gradient checkpointing off) and method.LoRA; 8 x 8 latents
    mid   the mid-size SDXL-shaped UNet of benchmark a (harness.MID_UNET, random weights, LoRA rank 4
          on the attention projections, lr 1e-4); 64 x 64 latents

One step is benchmark a's `minidream_step` (step.training_step + step.apply_gradients: noise, UNet,
DreamBooth loss, backward, clip, torch AdamW) on one prior-preservation batch (1 instance + 1 class
row, cached random text embeddings). Compiled = `unet.compile()` (nn.Module.compile: forward is
compiled in place, the module and its state_dict keys stay), default mode, dynamic=None or False.

Every case runs in a fresh child process (harness.run_child) with its own empty inductor cache
(TORCHINDUCTOR_CACHE_DIR), so "cold" is a first compile on this machine; a "warm" case reuses the
cache a cold case just filled (a user's second run of the same shapes: inductor's FX-graph and
AOT-autograd caches skip code generation, dynamo still traces). Each child takes `--warmup` steps,
then `--steps` timed ones:

    s/step         median of the timed steps
    compile s      (the warm-up steps' time) - (the eager child's warm-up steps' time): what compiling
                   adds to a run; for one warm-up step, the first step minus an eager first step
    break-even     compile s / (eager s/step - compiled s/step): the run length from which the
                   compiled run is faster in total ("never" if a compiled step is not faster)
    loss rel. diff max over all steps of |compiled - eager| / |eager| (same seed, same inputs)

Sampling (class images and validation grids are sampling): one 20-step DDIM image with guidance 5
on the tiny model through pipeline.generate, eager vs `unet.compile()`, `--images` images after
one warm-up image; and in the tiny model's default training case a validation image after the
training steps (eval mode, no grad: the compiled UNet recompiles) and one training step after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402

from benchmarks.harness import MID_UNET  # noqa: E402
from benchmarks.training_step import RANK, TARGETS, make_inputs, minidream_step  # noqa: E402
from minidream.lora import inject_lora, lora_parameters, lora_state_dict, mark_only_lora_trainable  # noqa: E402
from minidream.unet import UNet, UNetConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "tiny-sdxl"
RAW = ROOT / "runs" / "bench-compile" / "compile_step.json"  # every figure of the last run (runs/: not in git)
MID_LATENT, MID_LR = 64, 1e-4  # benchmark a's latent side and lr
PROMPT = "a photo of rraj person"
SAMPLE_STEPS, GUIDANCE = 20, 5.0  # the tiny preset's class_steps / validation_steps; the default guidance
COMPILE = {"eager": None, "compiled": {}, "compiled dynamic=False": {"dynamic": False}}


# ---------------------------------------------------------------------------------------------
# Children: one measured case each, in a fresh process


def tiny_model():
    from minidream.formats import load_model

    return load_model(TINY, torch.float32, "cpu")


def tiny_training(checkpointing: bool):
    """(model, unet, step) as train.py sets up a LoRA run of the tiny model on a CPU."""
    from minidream.config import TrainConfig, fill_defaults
    from minidream.method import LoRA

    model = tiny_model()
    cfg = TrainConfig(model=str(TINY), optimizer="adamw", precision="fp32")
    fill_defaults(cfg, model.default_size)  # the tiny preset
    cfg.gradient_checkpointing = checkpointing
    torch.manual_seed(cfg.seed)  # LoRA init, as train()
    method = LoRA(model, cfg, "rraj", "person")
    params = method.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    text = model.text.text_encoder, model.text.text_encoder_2
    inputs = make_inputs(model.default_size // model.vae_scale, context_dim=sum(e.config.hidden_size for e in text),
                         pooled_dim=text[1].config.projection_dim)
    return model, model.unet, minidream_step(model.unet, optimizer, params, inputs, None)


def mid_training(checkpointing: bool):
    """(None, unet, step): benchmark a's mid-size UNet and LoRA, fp32. Built here, not with benchmark
    a's build_pair: that also builds the diffusers + peft twin and copies the adapters over by peft
    names it no longer finds (KeyError '...lora_A.weight.weight' with peft 0.21)."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_dict(MID_UNET)).requires_grad_(False).train()
    inject_lora(unet, TARGETS, rank=RANK, alpha=RANK)  # B = 0, as train.py starts
    mark_only_lora_trainable(unet)
    unet.enable_gradient_checkpointing(checkpointing)
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=MID_LR, weight_decay=1e-4)
    return None, unet, minidream_step(unet, optimizer, params, make_inputs(MID_LATENT), None)


def compile_stats() -> dict:
    """Dynamo's counters: graphs compiled, graph breaks (reasons), recompilations."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": dict(counters["graph_break"]),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def sample_one(model, seed: int):
    """One validation / class image: pipeline.generate, as training.validate calls it."""
    from minidream.pipeline import generate
    from minidream.samplers import ddim

    return generate(model, PROMPT, sampler=ddim, steps=SAMPLE_STEPS, guidance_scale=GUIDANCE, seed=seed,
                    progress=False)[0]


def train_child(model_name: str, checkpointing: bool, variant: str, steps: int, warmup: int,
                validate: bool = False) -> dict:
    """One training case: build, compile (unless eager), warm-up + timed steps."""
    torch.set_num_threads(1)
    model, unet, step = (tiny_training if model_name == "tiny" else mid_training)(checkpointing)
    keys = list(unet.state_dict()), list(lora_state_dict(unet))
    if COMPILE[variant] is not None:
        unet.compile(**COMPILE[variant])
    out = {"lora_keys_same": list(lora_state_dict(unet)) == keys[1],
           "state_keys_same": list(unet.state_dict()) == keys[0], "lora_tensors": len(keys[1])}
    times, losses = [], []
    try:
        for _ in range(warmup + steps):
            s, loss = timed(step)
            times.append(s)
            losses.append(loss.item())
        if validate:  # a validation image mid-run (eval, no grad), then training again
            unet.eval()
            out["validation_s"] = [timed(lambda: sample_one(model, seed))[0] for seed in (0, 1)]
            unet.train()
            out["step_after_validation_s"] = timed(step)[0]
    except Exception as e:  # noqa: BLE001  (recorded, not hidden: the report shows it)
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return out | {"warmup_s": times[:warmup], "step_s": times[warmup:], "losses": losses,
                  "lora_sum": float(sum(v.abs().sum() for v in lora_state_dict(unet).values())),
                  "peak_rss_gib": harness.peak_rss_gib()} | compile_stats()


def sample_child(variant: str, images: int) -> dict:
    """Tiny-model sampling: one warm-up image, then `images` timed ones."""
    torch.set_num_threads(1)
    model = tiny_model()
    if COMPILE[variant] is not None:
        model.unet.compile(**COMPILE[variant])
    out, times, pixels = {}, [], None
    try:
        for seed in range(images + 1):
            s, image = timed(lambda: sample_one(model, seed))
            times.append(s)
            pixels = pixels or list(image.getdata())[:64]
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return out | {"warmup_s": times[:1], "image_s": times[1:], "pixels": pixels,
                  "peak_rss_gib": harness.peak_rss_gib()} | compile_stats()


# ---------------------------------------------------------------------------------------------
# The parent: cases, figures, report


def run_case(args: list[str], cache: str, log=print) -> dict:
    """One child with its inductor cache in `cache`; a failing child is recorded, not raised."""
    log(f"  child: {' '.join(args)} (cache {Path(cache).name})")
    try:
        figures = harness.run_child(["-m", "benchmarks.compile_step", "--child", *args], timeout=3600,
                                    env={"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache})
    except (RuntimeError, TimeoutError) as e:
        figures = {"error": str(e).strip().splitlines()[-1][:300], "step_s": [], "warmup_s": []}
    log("    " + json.dumps({k: v for k, v in figures.items() if k not in ("losses", "pixels")})[:600])
    return figures


def training_cases(quick: bool) -> list[tuple[str, str, str, str]]:
    """(model, checkpointing, variant, cache) in run order; cache "new" or the case it reuses."""
    if quick:
        return [("tiny", "off", "eager", "new"), ("tiny", "off", "compiled", "new")]
    return [("tiny", "off", "eager", "new"), ("tiny", "off", "compiled", "new"),
            ("tiny", "off", "compiled", "warm"), ("tiny", "off", "compiled dynamic=False", "new"),
            ("tiny", "on", "eager", "new"), ("tiny", "on", "compiled", "new"),
            ("mid", "off", "eager", "new"), ("mid", "off", "compiled", "new"), ("mid", "off", "compiled", "warm"),
            ("mid", "on", "eager", "new"), ("mid", "on", "compiled", "new")]


def compare(eager: dict, compiled: dict, key: str, warm_key: str = "warmup_s") -> dict:
    """s per unit, compile s, break-even count of `compiled` against `eager`."""
    if compiled.get("error") or not compiled[key]:
        return {"s": None, "compile_s": None, "break_even": "n/a (error)"}
    e, c = statistics.median(eager[key]), statistics.median(compiled[key])
    extra = sum(compiled[warm_key]) - sum(eager[warm_key])
    return {"s": c, "compile_s": extra, "break_even": f"{extra / (e - c):.0f}" if c < e else "never"}


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def loss_check(eager: dict, compiled: dict) -> str:
    if not compiled.get("losses"):
        return "n/a"
    return f"{rel_diff(compiled['losses'], eager['losses']):.1e}"


def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else x if isinstance(x, str) else format(x, spec)


def training_rows(results: dict) -> list[list]:
    rows = []
    for (model, ckpt, variant, cache), fig in results.items():
        eager = results[model, ckpt, "eager", "new"]
        if variant == "eager":
            rows.append([model, ckpt, variant, "", fmt(statistics.median(fig["step_s"]) if fig["step_s"] else None),
                         fmt(sum(fig["warmup_s"]), ".1f"), "", "", "", "", fig.get("error", "")])
            continue
        cmp = compare(eager, fig, "step_s")
        speed = f"{statistics.median(eager['step_s']) / cmp['s']:.2f}x" if cmp["s"] else "n/a"
        keys = "yes" if fig.get("lora_keys_same") and fig.get("state_keys_same") else "NO"
        rows.append([model, ckpt, variant, "cold" if cache == "new" else "warm", fmt(cmp["s"]),
                     fmt(sum(fig["warmup_s"]), ".1f"), fmt(cmp["compile_s"], ".1f"), speed, cmp["break_even"],
                     loss_check(eager, fig), fig.get("error", "") or f"keys same: {keys}; graphs {fig.get('graphs')}, "
                     f"graph breaks {sum(fig.get('graph_breaks', {}).values())}"])
    return rows


def sampling_rows(results: dict) -> list[list]:
    rows = []
    for (variant, cache), fig in results.items():
        eager = results["eager", "new"]
        cmp = compare(eager, fig, "image_s") if variant != "eager" else {
            "s": statistics.median(fig["image_s"]), "compile_s": "", "break_even": ""}
        same = (sum(abs(a - b) for p, q in zip(fig["pixels"] or [], eager["pixels"]) for a, b in zip(p, q))
                if fig.get("pixels") else None)
        rows.append(["tiny", variant, "" if variant == "eager" else ("cold" if cache == "new" else "warm"),
                     fmt(cmp["s"]), fmt(sum(fig["warmup_s"]), ".1f"), fmt(cmp["compile_s"], ".1f"),
                     cmp["break_even"], "" if variant == "eager" else f"first 64 pixels: summed abs. diff {same}",
                     fig.get("error", "")])
    return rows


def kept_figures(keep: bool) -> tuple[dict, dict]:
    """With --keep: the figures of the last run (RAW) of every model (or sampling) whose cases all
    ran without error; the rest is measured again."""
    if not keep or not RAW.exists():
        return {}, {}
    raw = json.loads(RAW.read_text())
    figures = [{tuple(k.split(" | ")): v for k, v in raw[part].items()} for part in ("train", "sample")]
    failed = {k[0] for k, v in figures[0].items() if v.get("error")}
    train = {k: v for k, v in figures[0].items() if k[0] not in failed}
    sample = figures[1] if not any(v.get("error") for v in figures[1].values()) else {}
    return train, sample


def run_all(args, log=print) -> tuple[dict, dict]:
    """Every training and sampling case; returns their figures keyed by case."""
    kept_train, kept_sample = kept_figures(getattr(args, "keep", False))
    with tempfile.TemporaryDirectory(prefix="compile-bench-") as tmp:
        caches, train, sample = {}, {}, {}
        for model, ckpt, variant, cache in training_cases(args.quick):
            key = model, ckpt, variant
            if (*key, cache) in kept_train:
                train[(*key, cache)] = kept_train[(*key, cache)]
                continue
            if cache == "new":
                caches[key] = tempfile.mkdtemp(dir=tmp)
            validate = not args.quick and model == "tiny" and ckpt == "off" and variant in ("eager", "compiled") \
                and cache == "new"
            steps = args.steps if model == "tiny" else args.mid_steps
            child = [model, ckpt, variant, str(steps), "1", "validate" if validate else "-"]
            train[model, ckpt, variant, cache] = run_case(["train", *child], caches[key], log)
        if not args.quick:
            for variant, cache in (("eager", "new"), ("compiled", "new"), ("compiled", "warm")):
                if (variant, cache) in kept_sample:
                    sample[variant, cache] = kept_sample[variant, cache]
                    continue
                if cache == "new":
                    caches["sample", variant] = tempfile.mkdtemp(dir=tmp)
                sample[variant, cache] = run_case(["sample", variant, str(args.images)],
                                                  caches["sample", variant], log)
    return train, sample


def demo_run(train: dict, sample: dict) -> tuple[list[list], list[float]]:
    """The tiny preset's run (PRESETS["tiny", "lora"]: 1200 steps, 40 class images and validation grids
    of 6 prompts x 2 seeds at steps 0, 500, 1000, 1200, all at 20 DDIM steps) from the measured rates:
    rows of (phase, count, eager s, compiled s with a cold cache, with a warm one; compile included),
    and the three totals. Every phase compiled: the class images' base UNet is compiled on its own
    (LoRA is injected later), and validation (eval mode, no grad) recompiles the training UNet once."""
    from minidream.config import PRESETS

    preset = PRESETS["tiny", "lora"]
    eager = train["tiny", "off", "eager", "new"]
    steps, images = preset["steps"], preset["num_class_images"]
    shown = 6 * 2 * (len(range(0, steps, preset["validate_every"])) + 1)  # data/raj's 6 prompts x 2 seeds
    rows = []
    for phase, count, key, sampled in (("training steps", steps, "step_s", False),
                                       ("class images", images, "image_s", True),
                                       ("validation images", shown, "image_s", True)):
        base = sample["eager", "new"] if sampled else eager
        row = [phase, count, count * statistics.median(base[key])]
        for cache in ("new", "warm"):
            fig = sample["compiled", cache] if sampled else train["tiny", "off", "compiled", cache]
            extra = compare(base, fig, key)["compile_s"]
            if phase == "validation images" and cache == "new":  # measured inside the training run
                extra = train["tiny", "off", "compiled", "new"]["validation_s"][0] - eager["validation_s"][0]
            row.append(extra + count * statistics.median(fig[key]))
        rows.append(row)
    return rows, [sum(r[i] for r in rows) for i in (2, 3, 4)]


def conclusion(train: dict, sample: dict) -> str:
    """The verdict in words, from the figures (so that a re-run on another machine says its own)."""

    def pays(model: str, ckpt: str, variant="compiled", cache="new") -> str:
        fig, eager = train.get((model, ckpt, variant, cache)), train[model, ckpt, "eager", "new"]
        if fig is None:
            return "not measured"
        cmp = compare(eager, fig, "step_s")
        if cmp["s"] is None:
            return f"failed ({fig.get('error')})"
        e = statistics.median(eager["step_s"])
        even = "never breaks even" if cmp["break_even"] == "never" else f"break-even {cmp['break_even']} steps"
        return f"{e:.3f} -> {cmp['s']:.3f} s/step ({e / cmp['s']:.2f}x), compile {cmp['compile_s']:.0f} s, {even}"

    lines = ["Conclusion (generated from the figures above):", "",
             f"- tiny model, preset (checkpointing off), cold cache: {pays('tiny', 'off')}; warm cache: "
             f"{pays('tiny', 'off', cache='warm')}; checkpointing on: {pays('tiny', 'on')}.",
             f"- mid model, checkpointing off: {pays('mid', 'off')}; warm cache: {pays('mid', 'off', cache='warm')}; "
             f"checkpointing on (the sdxl preset's setting): {pays('mid', 'on')}."]
    if sample:
        cmp = compare(sample["eager", "new"], sample["compiled", "new"], "image_s")
        warm = compare(sample["eager", "new"], sample["compiled", "warm"], "image_s")
        lines.append(f"- tiny model sampling (20 DDIM steps, guidance): break-even {cmp['break_even']} images cold, "
                     f"{warm['break_even']} warm.")
        rows, (total_e, cold, warm) = demo_run(train, sample)
        verdict = {True: "pays", False: "does not pay"}
        lines.append(f"- the tiny preset's demo run ({rows[0][1]} steps, {rows[1][1]} class images, {rows[2][1]} "
                     f"validation images): eager {total_e:.0f} s, compiled {cold:.0f} s with a cold inductor cache "
                     f"(a first run: compiling {verdict[cold < total_e]}), {warm:.0f} s with a warm one (a repeated "
                     f"run of the same shapes: compiling {verdict[warm < total_e]}), compile time included.")
    return "\n".join(lines)


def kept_note(args) -> str:
    if not getattr(args, "keep", False) or not RAW.exists():
        return ""
    earlier = json.loads(RAW.read_text()).get("machine", {}).get("load average", "?")
    return (f"\nWith --keep, cases measured without error by the previous run of this command (load average "
            f"{earlier}; raw figures in runs/bench-compile/compile_step.json) were kept, not measured again.")


def report(args, info: dict, train: dict, sample: dict) -> str:
    headers = ["model", "grad. ckpt", "UNet", "inductor cache", "s/step", "warm-up step s", "compile s",
               "speed-up", "break-even steps", "loss rel. diff", "notes"]
    table = harness.markdown_table(headers, training_rows(train))
    body = f"""## g. torch.compile of the UNet: LoRA training step and sampling, compile time included (CPU)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Config: see benchmarks/compile_step.py. fp32, `torch.set_num_threads(1)`, each case a fresh process
with its own empty inductor cache ("cold"; "warm": the same cache again, as a second run). tiny:
weights/tiny-sdxl (64 px, 8 x 8 latents), the tiny preset's LoRA (rank 4 on attn,ff,proj, lr 3e-3);
mid: benchmark a's UNet (channels (64, 128, 256), depth (0, 2, 4), LoRA rank 4 on attention, 64 x 64
latents). One step: benchmark a's `minidream_step` (training_step + apply_gradients, batch 1 + 1 class
row). Compiled: `unet.compile()` (nn.Module.compile, default mode). s/step: median of {args.steps} steps (mid:
{args.mid_steps}) after 1 warm-up step; compile s: compiled warm-up step minus the eager one;
break-even: compile s / (eager - compiled s/step); loss rel. diff: max over all steps of |compiled -
eager| / |eager|, same seed and inputs; keys same: the UNet's state_dict and LoRA keys after compile
are those before.{kept_note(args)}

{table}
"""
    if sample:
        rows = sampling_rows(sample)
        body += "\nSampling: one 64 px image, 20 DDIM steps, guidance 5 (UNet batch 2), `pipeline.generate` on the " \
                f"tiny model; s/image: median of {args.images} after one warm-up image.\n\n" + harness.markdown_table(
                    ["model", "UNet", "inductor cache", "s/image", "warm-up image s", "compile s",
                     "break-even images", "same image", "error"], rows) + "\n"
        fig, eager = train["tiny", "off", "compiled", "new"], train["tiny", "off", "eager", "new"]
        if "validation_s" in fig and "validation_s" in eager:
            body += (f"\nInside a compiled training run (tiny, after the training steps): the first validation image "
                     f"took {fig['validation_s'][0]:.1f} s (eager {eager['validation_s'][0]:.2f} s: eval mode and "
                     f"no_grad recompile the UNet), the second {fig['validation_s'][1]:.2f} s (eager "
                     f"{eager['validation_s'][1]:.2f} s); the next training step "
                     f"{fig['step_after_validation_s']:.2f} s "
                     f"(eager {eager['step_after_validation_s']:.2f} s).\n")
        rows, totals = demo_run(train, sample)
        body += ("\nThe tiny preset's demo run from these rates, every phase compiled (compile included; model "
                 "loading, VAE encoding and saving left out, they are the same both ways). Warm: the validation "
                 "recompile is taken as the warm class-image compile (not measured inside a run):\n\n"
                 + harness.markdown_table(["phase", "count", "eager s", "compiled s, cold cache",
                                           "compiled s, warm cache"], rows + [["total", "", *totals]]) + "\n")
    return body + ("" if args.quick else "\n" + conclusion(train, sample) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of the tiny model")
    parser.add_argument("--mid-steps", type=int, default=5, help="timed steps of the mid model")
    parser.add_argument("--images", type=int, default=4, help="timed sampled images per case")
    parser.add_argument("--quick", action="store_true", help="tiny model training only, eager vs compiled")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the last run's figures of models measured without error (see RAW)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 3)
    if args.child:
        kind, *rest = args.child
        if kind == "train":
            model, ckpt, variant, steps, warmup, validate = rest
            out = train_child(model, ckpt == "on", variant, int(steps), int(warmup), validate == "validate")
        else:
            out = sample_child(rest[0], int(rest[1]))
        print(json.dumps(out))
        return
    info = harness.machine(1)
    print(harness.machine_lines(info))
    train, sample = run_all(args)
    body = report(args, info, train, sample)
    print(body)
    RAW.parent.mkdir(parents=True, exist_ok=True)
    RAW.write_text(json.dumps({"machine": info, "train": {" | ".join(k): v for k, v in train.items()},
                               "sample": {" | ".join(k): v for k, v in sample.items()}}, indent=1))
    if not args.no_write and not args.quick:
        harness.write_section("compile", body)
        print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
