"""Section 11 of the toy experiments: the methods people train with now, side by side.

LoRA (the demo recipe), DoRA (--dora), pivotal tuning (--method pivotal), LoRA with an EMA of its
weights (--ema-decay) and textual inversion (its best toy setting: 3 vectors after the noun), at the
demo's step budget and seed, each with a small sweep of its own knob (learning rate or decay), and
LoRA, LoRA + EMA, DoRA and pivotal tuning once more with training seed 1, for the run-to-run noise:

    look, edits     the subject's look for "a photo of rraj person", and kept under the 7 edits (mean)
    drift           "a photo of person" shows the subject (lower is better)
    fields right    what the model still knows: the judge's field accuracy on 256 captions drawn like
                    the pretraining ones (none names the subject); the base model: 94%
    size, train s   the result's files, and the run's wall time (class images included where drawn)

Every variant's figures are stored in OUT/methods/VARIANT.json once measured, keyed by its settings,
so the section can be measured by several processes (--variants) and assembled by a last run:

    python -m minidream.toy.toy_experiments --only 11 --samples 64
"""

from __future__ import annotations

import json
import time

from minidream.config import EMBEDDING_FILE, LORA_FILE
from minidream.data import load_subject
from minidream.formats.models import REPO
from minidream.methods.textual_inversion import load_embedding, name_the_word
from minidream.toy import toy_eval as te
from minidream.toy.context_experiment import pct

CAPTIONS = 256  # pretraining-like captions for "fields right"


def after_the_noun(prompt: str) -> str:
    """'a photo of rraj person on the beach' -> 'a photo of person rraj on the beach'."""
    return prompt.replace("rraj person", "person rraj")


# Textual inversion's word after the noun, where toy captions describe a person, as 3 vectors (docs/methods.md)
AFTER_THE_NOUN = dict(instance_prompt=after_the_noun("a photo of rraj person"), num_vectors=3)
# name -> (method label, train.py settings, the word after the noun?). The demo recipe: lr 3e-3, 1200 steps.
VARIANTS = {
    "lora": ("LoRA (the demo)", {}, False),
    "lora-seed-1": ("LoRA (the demo), training seed 1", dict(seed=1), False),  # run-to-run noise
    "lora-ema-0.99": ("LoRA + EMA 0.99", dict(ema_decay=0.99), False),
    "lora-ema-0.99-seed-1": ("LoRA + EMA 0.99, training seed 1", dict(ema_decay=0.99, seed=1), False),
    "lora-ema-0.995": ("LoRA + EMA 0.995", dict(ema_decay=0.995), False),
    "lora-ema-0.999": ("LoRA + EMA 0.999", dict(ema_decay=0.999), False),
    "dora-1.5e-3": ("DoRA, lr 1.5e-3", dict(dora=True, lr=1.5e-3), False),
    "dora-3e-3": ("DoRA, lr 3e-3", dict(dora=True), False),
    "dora-3e-3-seed-1": ("DoRA, lr 3e-3, training seed 1", dict(dora=True, seed=1), False),
    "dora-6e-3": ("DoRA, lr 6e-3", dict(dora=True, lr=6e-3), False),
    "pivotal-5e-4": ("pivotal, word lr 5e-4", dict(method="pivotal", embedding_lr=5e-4), False),
    "pivotal-5e-3": ("pivotal, word lr 5e-3", dict(method="pivotal", embedding_lr=5e-3), False),
    "pivotal-5e-3-seed-1": ("pivotal, word lr 5e-3, training seed 1", dict(method="pivotal", embedding_lr=5e-3, seed=1),
                            False),
    "pivotal-after-5e-3": ("pivotal, word lr 5e-3, 3 vectors after the noun",
                           dict(method="pivotal", embedding_lr=5e-3, **AFTER_THE_NOUN), True),
    "ti-after": ("textual inversion, 3 vectors after the noun", dict(method="textual-inversion", **AFTER_THE_NOUN), True),
}


def judged(e, model, name_the_subject) -> dict:
    """Look, edits, drift and fields right of a model whose prompts name the subject as given."""
    r = e.subject_rows(model, name_the_subject) | e.drift(model)
    prompts = te.world_prompts(CAPTIONS, seed=e.s.seed)
    fields = te.prompt_agreement(e.judge, te.sample_images(model, prompts, seed=e.s.seed), prompts)["fields"]
    return {"look": r["instance"], "edits": r["edits"], "drift": r["drift"], "fields": fields,
            "prompt": name_the_subject("a photo of rraj person")}


def measure(e, name: str) -> dict:
    """Train variant `name` on data/raj and judge it (e: toy_experiments.Experiments)."""
    label, settings, after = VARIANTS[name]
    e.tag = f"methods-{name}"
    move = after_the_noun if after else str
    validation = [move(p) for p in load_subject(REPO / "data" / "raj").validation_prompts]
    run = e.train(label, REPO / "data" / "raj", validation_prompts=validation, **settings).parent
    files = [f for f in (run / LORA_FILE, run / EMBEDDING_FILE) if f.is_file()]
    model = e.model([(run / LORA_FILE, 1.0)] if run / LORA_FILE in files else [])
    word, vectors = load_embedding(model.text, run / EMBEDDING_FILE) if run / EMBEDDING_FILE in files else ("rraj", 1)
    figures = judged(e, model, lambda prompt: name_the_word(move(prompt), "rraj", word, vectors))
    return figures | {"bytes": sum(f.stat().st_size for f in files), "seconds": e.seconds, "run": run.name,
                      "files": [f.name for f in files]}


def stored(e, name: str) -> dict:
    """The variant's figures from OUT/methods/NAME.json if measured with these settings, else measured now
    ("base": the bundled model itself)."""
    settings = repr(VARIANTS[name][1]) if name in VARIANTS else name
    key = {"settings": settings, "samples": e.s.samples, "seed": e.s.seed, "steps": e.s.steps}
    path = e.out / "methods" / f"{name}.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    if kept.get("key") == key:
        return kept["figures"]
    start = time.perf_counter()
    if name == "base":
        e.tag = "methods-base"
        figures = judged(e, e.model(), str)
    else:
        figures = measure(e, name)
    figures["measured_s"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "figures": figures}, indent=1))
    return figures


def methods_now(e, variants: str = "") -> str:
    """Section 11 as markdown. variants: measure only these (comma-separated), and list only them."""
    names = [n for n in VARIANTS if not variants or n in variants.split(",")]
    rows = ["| method | prompt | writes | size | train s | subject's look | subject + edit (mean of 7) | drift | "
            "fields right (256 captions) |", "| --- " * 9 + "|"]
    for name in names:
        f = stored(e, name)
        rows.append(f"| {VARIANTS[name][0]} | \"{f['prompt']}\" | {' + '.join(f['files'])} | {f['bytes'] / 1e3:.1f} KB "
                    f"| {f['seconds']:.0f} | {pct(f['look'])} | {pct(f['edits'])} | {pct(f['drift'])} | "
                    f"{pct(f['fields'])} |")
    noise = 50 / e.s.samples ** 0.5
    return "\n".join(rows + [
        "", f"The demo recipe (1200 steps, seed 0, prior preservation with 40 class images, lr 3e-3) unless the "
        f"row says otherwise. {e.s.samples} samples per prompt: a share's standard error is up to {noise:.0f} points; "
        f"fields right, over {CAPTIONS} captions, up to {50 / CAPTIONS ** 0.5:.0f}. The base model gets "
        f"{pct(stored(e, 'base')['fields'])} of fields right on the same captions and seeds. Train s is wall time "
        "with other variants measured in parallel processes on the same cores: compare it loosely."])
