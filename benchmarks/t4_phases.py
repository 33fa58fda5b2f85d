"""The planner's whole run on a 16 GB T4, phase by phase: minidream's SDXL recipe beside diffusers'
training script's (predicted; no GPU, no weights).

    OMP_NUM_THREADS=1 python -m benchmarks.t4_phases [--threads 1] [--no-write]

SDXL base 1.0 is planned from its config.json files (configs/sdxl-base-1.0) on fake tensors, as
`train.py --plan` plans it, with minidream's default T4 recipe. Each recipe's run is a recipes.Work
(how many optimizer steps, guided UNet calls, VAE encodes and decodes it computes), priced phase by
phase by recipes.estimate_time at the same assumed T4 rates; the training step costs the same on
both sides (benchmarks a and b: it is at parity):

  a  minidream, train.py's SDXL presets (recipes.run_work)
  b  diffusers' train_dreambooth_lora_sdxl.py (../shared/reference) with its defaults for the other
     phases and a --validation_prompt given (diffusers_work; the constants below name the lines of
     the script that set them)
  c  minidream with diffusers' phase settings where train.py has them (MATCHED): c - b is what
     minidream's latent cache saves over encoding every step's batch

The section written to RESULTS.md says what each recipe counts and what is left out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402

from minidream.config import TrainConfig  # noqa: E402
from minidream.planner import memory, recipes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SDXL = str(REPO / "configs" / "sdxl-base-1.0")
# diffusers' train_dreambooth_lora_sdxl.py defaults (lines of that file)
REFERENCE_CLASS_IMAGES = 100  # --num_class_images (l. 395)
REFERENCE_SAMPLE_BATCH = 4  # --sample_batch_size (l. 445): prompts per pipeline(prompt) call (l. 1073)
PIPELINE_STEPS = 50  # StableDiffusionXLPipeline's num_inference_steps (guidance_scale 5.0): l. 1073, 1937
VALIDATION_IMAGES = 4  # --num_validation_images (l. 367), one pipeline call each (l. 220)
VALIDATION_EPOCHS = 50  # --validation_epochs (l. 373): validation after every 50th epoch (l. 1912)
FINAL_VALIDATION_STEPS = 25  # the final inference's num_inference_steps (l. 2003)
MATCHED = dict(num_class_images=REFERENCE_CLASS_IMAGES, class_steps=PIPELINE_STEPS, class_batch=REFERENCE_SAMPLE_BATCH,
               validate_every=1000, validation_prompts=["a photo of rraj person"], validation_seeds=[0, 1, 2, 3],
               validation_steps=38)
MATCHED_FLAGS = ("--num-class-images 100 --class-steps 50 --class-batch 4 --validate-every 1000 "
                 "--validation-prompt 'a photo of rraj person' --validation-seeds 0 1 2 3 --validation-steps 38")


def diffusers_work(steps: int, photos: int = recipes.ASSUMED_PHOTOS, batch: int = 1) -> recipes.Work:
    """What diffusers' script computes in a run of `steps` at `batch` subject photos per step, with
    its defaults otherwise and a validation prompt given (see the top)."""
    epoch = math.ceil(max(REFERENCE_CLASS_IMAGES, photos) / batch)  # optimizer steps per epoch
    validations = sum(1 for e in range(math.ceil(steps / epoch)) if e % VALIDATION_EPOCHS == 0)
    return recipes.Work(steps=steps, class_images=REFERENCE_CLASS_IMAGES, class_steps=PIPELINE_STEPS,
                        class_batch=REFERENCE_SAMPLE_BATCH, encodes=2 * batch * steps,
                        validation_images=VALIDATION_IMAGES * (validations + 1),
                        validation_calls=VALIDATION_IMAGES * (validations * PIPELINE_STEPS + FINAL_VALIDATION_STEPS))


def describe(work: recipes.Work) -> dict[str, str]:
    """Each phase's work in words, for the table."""
    return {"class images": f"{work.class_images} x {work.class_steps} steps",
            "latent cache": f"{work.encodes} encodes",
            "training steps": f"{work.steps} steps",
            "validation": f"{work.validation_images} images, {work.validation_calls} UNet calls"}


def section(info: dict) -> str:
    """Plan the three recipes (fake runs shared through `runs`) and write the RESULTS.md section."""
    runs = {}
    plan = memory.plan_training(TrainConfig(model=SDXL), runs)
    matched = memory.plan_training(TrainConfig(model=SDXL, **MATCHED), runs)
    works = {"a": recipes.run_work(plan.cfg), "b": diffusers_work(plan.cfg.steps), "c": recipes.run_work(matched.cfg)}
    timings = {"a": recipes.estimate_time(plan, works["a"]), "b": recipes.estimate_time(plan, works["b"]),
               "c": recipes.estimate_time(matched, works["c"])}
    words = {k: describe(w) for k, w in works.items()}
    names = {"latent cache": "latent cache (b: every step's VAE encodes)"}
    rows = []
    for phase in timings["a"].phases:
        s = {k: t.phases[phase] for k, t in timings.items()}
        rows.append([names.get(phase, phase), *[f"{s[k]:,.0f} ({words[k][phase]})" for k in "abc"],
                     ratio(s["a"], s["b"]), ratio(s["c"], s["b"])])
    total = {k: t.run_s for k, t in timings.items()}
    rows.append(["**whole run**", *[f"**{total[k]:,.0f}** ({total[k] / 3600:.2f} h)" for k in "abc"],
                 f"**{ratio(total['a'], total['b'])}**", f"**{ratio(total['c'], total['b'])}**"])
    table = harness.markdown_table(["phase", "a: minidream, train.py presets (s)", "b: diffusers' script, its defaults (s)",
                                    "c: minidream, diffusers' phase settings (s)", "a / b", "c / b"], rows)
    print(table)
    unit = {name: recipes.estimate_time(plan, recipes.Work(0, 0, 0, 1, *counts)).phases[phase]
            for name, counts, phase in (("call", (0, 0, 1), "validation"), ("decode", (0, 1, 0), "validation"),
                                        ("encode", (1, 0, 0), "latent cache"))}
    return f"""## T4 whole run by phase: minidream's recipe vs diffusers' script's (`--plan`, predicted)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Predicted, never measured on a GPU. SDXL base 1.0 (configs/) planned on fake tensors with
minidream's default T4 recipe (LoRA rank 4 on the attention, 1024 px, 1 subject + 1 class image per
step, fp16 autocast, 8-bit AdamW, gradient checkpointing, fp16 base, untiled fp32 VAE), priced by
minidream/planner/recipes.estimate_time at its assumed T4 rates (30% of 65 TFLOP/s fp16, 8.1
TFLOP/s fp32 for the VAE): {timings["a"].step_s:.2f} s per optimizer step, {unit["call"]:.3f} s per guided
UNet call (one sampler step of one image: batch 2), {unit["encode"]:.2f} s per VAE encode and
{unit["decode"]:.2f} s per VAE decode of one 1024 px image.

Assumption: the training step costs the same on both sides (benchmarks a and b: minidream's step is
at parity with diffusers'), so only the other phases differ; both run 1000 steps at 1 + 1 images.

- **a**: `python train.py --model configs/sdxl-base-1.0` (presets: 200 class images at 15 DPM-Solver++(2M)
  steps, guidance 5; the latent cache encodes 10 photos (assumed) x 4 views + the class images once;
  validation at step 0 and every 250 steps, 12 images (6 prompts x 2 seeds) at 15 steps).
- **b**: diffusers' `train_dreambooth_lora_sdxl.py` defaults (../shared/reference; line numbers there):
  `--num_class_images` 100 (l. 395) drawn by `pipeline(prompt)` (l. 1073) at StableDiffusionXLPipeline's
  50 steps, guidance 5 (pipeline_stable_diffusion_xl.py l. 831, 835), `--sample_batch_size` 4 (l. 445);
  no latent cache: each step VAE-encodes its subject photo and class image in fp32 (l. 1685, 1181);
  validation only with a `--validation_prompt` (default none, l. 359), here given one: 4 images
  (l. 367) at 50 steps after every 50th epoch (l. 373, 1912; an epoch = 100 steps at batch 1, l. 853:
  after epoch 0 only) and 4 at 25 steps at the end (l. 2003).
- **c**: `python train.py --model configs/sdxl-base-1.0 {MATCHED_FLAGS}`:
  diffusers' class-image count, steps and batch; validation as close as one step count allows (8
  images, 304 UNet calls vs b's 300). Its latent cache stays, so c - b is what caching latents saves.

Left out on both sides: loading weights (diffusers' script also reloads a pipeline for each
validation and at the end), text encoding (both encode their prompts once), checkpoints, saving
images. Batching class images changes no FLOP count (a batch of 4 costs 4 images' FLOPs; a
fp16 base has no dequantisation to share), so no batching speed-up is assumed on either side.

{table}

{summary(timings)}
"""


def summary(timings: dict) -> str:
    """The table in two sentences: the whole runs, and the phases that make the difference."""
    a, b, c = (timings[k] for k in "abc")
    encodes = b.phases["latent cache"]
    return (f"Summary: minidream's presets are predicted at {a.run_s / 3600:.2f} h, diffusers' defaults at "
            f"{b.run_s / 3600:.2f} h ({ratio(a.run_s, b.run_s)}); with diffusers' phase settings minidream is at "
            f"{c.run_s / 3600:.2f} h ({ratio(c.run_s, b.run_s)}). The difference is diffusers' VAE encode of every "
            f"step's batch ({encodes:,.0f} s, {encodes / b.run_s:.0%} of its run) against minidream's cache "
            f"({c.phases['latent cache']:,.0f} s in c); minidream's presets spend more on validation "
            f"({a.phases['validation']:,.0f} s vs {b.phases['validation']:,.0f} s: 5 grids of 12 images) and less "
            f"on class images ({a.phases['class images']:,.0f} s vs {b.phases['class images']:,.0f} s: twice the "
            "images at under a third of the steps).")


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = harness.machine(args.threads)
    print(harness.machine_lines(info))
    body = section(info)
    print(body)
    if not args.no_write:
        harness.write_section("t4-phases", body)
        print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
