"""Section 9 of the toy experiments: DreamBooth on a quantised frozen base (--base-weights).

QLoRA (Dettmers et al. 2023) trains LoRA adapters on top of a frozen base stored in 4 bits; with
int8 or nf4 base weights the SDXL UNet's Linear layers take 2.71 or 1.73 GiB instead of 4.78 (benchmarks/
RESULTS.md, quantised base). Here the demo recipe trains data/raj on the bundled model with each base
format, same seed, and each LoRA is judged twice: on the base it trained on (what a small GPU samples
with) and on the full-precision base (the LoRA file is the same kind of file either way).

    python -m minidream.toy.toy_experiments --only 9 --samples 64
"""

from __future__ import annotations

from minidream.formats.lora_files import add_loras
from minidream.formats.models import REPO, load_model

FORMATS = ("fp16", "int8", "nf4")  # "fp16": --precision's weight dtype, fp32 on a CPU
SLACK = 0.05  # the target: look, edits and drift within 5 points of the full-precision base


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def judged(e, lora, base_weights: str) -> dict:
    """Look, edits (mean), drift of `lora` on the bundled model loaded with `base_weights`."""
    model = load_model(e.model_path, base_weights=base_weights)
    add_loras(model, [(lora, 1.0)])
    rows = e.subject_rows(model)
    return {"look": rows["instance"], "edits": rows["edits"], "drift": e.drift(model)["drift"]}


def quantised_base(e) -> str:
    """Section 9 as a markdown table. e: toy_experiments.Experiments."""
    table = ["| base weights while training | sampled on | subject's look | subject + edit (mean of 7) | drift | "
             "train s | within 5 points of fp16 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    reference = None
    for fmt in FORMATS:
        e.tag = f"base-{fmt}"
        lora = e.train(f"base weights {fmt}", REPO / "data" / "raj", base_weights=fmt)
        seconds = e.seconds
        for sampled_on in dict.fromkeys([fmt, "fp16"]):
            e.tag = f"base-{fmt}-sampled-{sampled_on}"
            r = judged(e, lora, sampled_on)
            reference = reference or r
            close = all(abs(r[k] - reference[k]) <= SLACK for k in ("look", "edits", "drift"))
            table.append(f"| {fmt} | {sampled_on} | {pct(r['look'])} | {pct(r['edits'])} | {pct(r['drift'])} | "
                         f"{seconds:.0f} | {'' if r is reference else ('yes' if close else 'no')} |")
    return "\n".join(table) + (
        "\n\nThe same seed, data and recipe in every row; \"fp16\" is the precision's own weight dtype (fp32 on this "
        f"CPU). {e.s.samples} samples per prompt give each share a standard error of up to "
        f"{50 / e.s.samples ** 0.5:.0f} points.")
