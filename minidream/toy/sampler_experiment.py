"""Section 10 of the toy experiments: class images and validation grids from fewer sampler steps.

DPM-Solver++(2M) (Lu et al. 2022, more_samplers/dpmpp.py) at 10, 15 and 20 steps against DDIM at 20,
30 and 50, measured three ways:

    base model   what class images are made of: fields right on 4 x samples pretraining-like
                 captions, and "a photo of person": a person, and their diversity (DIV)
    demo LoRA    what validation grids show: the subject's look and edits, sampled with each setting
    DreamBooth   the demo run with its class images drawn with each setting (a class folder of its
                 own): look, edits, drift, judged on DDIM 20 samples as in every section

The presets' sampler for class images and validation (config.PRESETS) is chosen from these tables:
the cheapest setting that matches DDIM 30 within the noise.

    python -m minidream.toy.toy_experiments --only 10 --samples 64
"""

from __future__ import annotations

import time

from minidream.formats.models import REPO
from minidream.more_samplers import SAMPLERS
from minidream.toy import toy_eval as te
from minidream.toy.context_experiment import pct

SETTINGS = (("ddim", 20), ("ddim", 30), ("ddim", 50), ("dpmpp-2m", 10), ("dpmpp-2m", 15), ("dpmpp-2m", 20))


def base_row(e, name: str, steps: int) -> str:
    """The base model sampled with one setting: field accuracy, "a photo of person", s / image."""
    model, sampling = e.model(), {"sampler": SAMPLERS[name], "steps": steps}
    prompts = te.world_prompts(4 * e.s.samples, seed=e.s.seed)
    start = time.perf_counter()
    agree = te.prompt_agreement(e.judge, te.sample_images(model, prompts, seed=e.s.seed, **sampling), prompts)
    seconds = (time.perf_counter() - start) / len(prompts)
    d = e.drift(model, **sampling)
    return (f"| {name} | {steps} | {pct(agree['fields'])} | {pct(agree['images'])} | {pct(d['person'])} | "
            f"{d['div']:.2f} | {seconds:.3f} |")


def fewer_steps(e) -> str:
    """Section 10 as markdown: three tables. e: toy_experiments.Experiments."""
    base = ["| sampler | steps | fields right (4 x samples captions) | images with every field right | "
            "\"a photo of person\" shows a person | its diversity (DIV) | s / image |", "| --- " * 7 + "|"]
    lora_rows = ["| sampler | steps | subject's look | subject + edit (mean of 7) |", "| --- " * 4 + "|"]
    dreambooth = ["| class images drawn with | steps | subject's look | subject + edit (mean of 7) | drift | "
                  "\"a photo of person\" DIV | train s (class images included) |", "| --- " * 7 + "|"]
    for name, steps in SETTINGS:
        e.tag = f"fewer-steps-base-{name}-{steps}"
        base.append(base_row(e, name, steps))
        e.tag = f"fewer-steps-classes-{name}-{steps}"
        lora = e.train(f"class images {name} {steps} steps", REPO / "data" / "raj", sampler=name, class_steps=steps,
                       class_dir=str(e.out / "class-images-samplers" / f"{name}-{steps}"))
        r = e.subject_rows(model := e.model([(lora, 1.0)])) | e.drift(model)
        dreambooth.append(f"| {name} | {steps} | {pct(r['instance'])} | {pct(r['edits'])} | {pct(r['drift'])} | "
                          f"{r['div']:.2f} | {e.seconds:.0f} |")
        if (name, steps) == ("ddim", 20):  # the demo recipe's own class images
            demo = lora
    for name, steps in SETTINGS:
        e.tag = f"fewer-steps-validation-{name}-{steps}"
        r = e.subject_rows(e.model([(demo, 1.0)]), sampler=SAMPLERS[name], steps=steps)
        lora_rows.append(f"| {name} | {steps} | {pct(r['instance'])} | {pct(r['edits'])} |")
    noise = 50 / e.s.samples ** 0.5
    return "\n".join([
        "Class images: the base model sampled with each setting (guidance 5).", "", *base, "",
        "DreamBooth with those class images (the demo recipe otherwise; each judged on DDIM 20 samples):", "",
        *dreambooth, "",
        "Validation: the demo LoRA (class images from DDIM 20) sampled with each setting:", "", *lora_rows, "",
        f"{e.s.samples} samples per prompt: a share's standard error is up to {noise:.0f} points; the field "
        f"accuracy's, over {4 * e.s.samples} captions, up to {noise / 2:.0f}."])
