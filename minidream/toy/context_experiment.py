"""Section 8 of the toy experiments: context leak, when every photo of the subject shares one background.

The six photos of data/raj-city (toyworld.write_context_subject) show the subject in front of one
and the same city street, as real photos often share a sofa or a wall. Trained on them as they are,
a LoRA can learn the street as part of "rraj": "a photo of rraj person", which names no place, then
shows the city in most samples. The trainer offers two remedies, and the section measures both:

  captions  a caption per photo naming the background (rraj_0.txt: "a photo of rraj person in the
            city"), used instead of the instance prompt: "in the city" takes the street, the token
            keeps the person;
  masks     a mask per photo (rraj_0-masklabel.png, white = subject): the loss counts each latent
            pixel of the background with weight `unmasked_weight` (a TrainConfig setting) only.

It trains the four combinations (plain, captions, masks, both) with the demo's settings, masks
alone at each weight of UNMASKED_WEIGHTS, and reports for each LoRA the subject's look, the subject
kept under the edit prompts (mean), drift, and the context leak: the share of "a photo of rraj
person" samples in which the judge sees the city. The base model's share is the floor: with no place
named it draws any of the six places. When section 2-3 ran in the same process, the demo LoRA (data/raj,
two of six photos in the city) gets a row too.

    python -m minidream.toy.toy_experiments --only 8 --samples 64 --threads 2
"""

from __future__ import annotations

from minidream.toy import toy_eval as te
from minidream.toy import toyworld as tw

PROMPT = f"a photo of {tw.TOKEN} {tw.CLASS_NOUN}"  # names no place: a city in its samples is a leak
UNMASKED_WEIGHTS = (0.0, 0.1, 0.3)  # the sweep of the background's loss weight, masks alone
LOOK_SLACK = 0.05  # a remedy may cost at most 5 points of the subject's look...
LEAK_CUT = 0.5  # ...and must leave at most half the plain run's leak


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def leak(e, model) -> float:
    """Share of PROMPT's samples in which the judge sees the photos' shared background."""
    return te.shows(e.judge, e.images(model, PROMPT), {"context": tw.SHARED_CONTEXT})


def measure(e, model) -> dict[str, float]:
    """One table row's figures: look, edits (mean), drift and leak."""
    rows = e.subject_rows(model)
    return {"look": rows["instance"], "edits": rows["edits"], "drift": e.drift(model)["drift"],
            "leak": leak(e, model)}


def train_variant(e, captions: bool, masks: bool, unmasked_weight: float | None = None) -> dict:
    """Write data/raj-city with or without captions and masks under e.out, train a LoRA on it with
    the demo's settings (plus `unmasked_weight` when there are masks) and measure it."""
    name = "-".join(["raj-city"] + ["captions"] * captions + ["masks"] * masks)
    folder = tw.write_context_subject(e.out / "subjects" / name, captions, masks)
    overrides = {"unmasked_weight": unmasked_weight} if masks else {}
    e.tag = "context-" + name + (f"-w{unmasked_weight}" if masks else "")
    lora = e.train(f"context leak: {name}" + (f", unmasked_weight {unmasked_weight}" if masks else ""),
                   folder, **overrides)
    return measure(e, e.model([(lora, 1.0)]))


def reached(r: dict, plain: dict) -> bool:
    """A remedy works: it cuts plain's leak at least by LEAK_CUT, its look at most LOOK_SLACK below."""
    return r["leak"] <= LEAK_CUT * plain["leak"] and r["look"] >= plain["look"] - LOOK_SLACK


def context_leak(e, unmasked_weight: float) -> str:
    """Section 8 as a markdown table. e: toy_experiments.Experiments; unmasked_weight: the weight
    of the "masks" and "captions + masks" rows (the project default), swept for masks alone."""
    e.tag = "context-base"
    floor = leak(e, e.model())
    rows = {"plain": train_variant(e, False, False),
            "captions naming the background": train_variant(e, True, False)}
    weights = UNMASKED_WEIGHTS + (() if unmasked_weight in UNMASKED_WEIGHTS else (unmasked_weight,))
    for w in weights:
        rows[f"masks, unmasked_weight {w}"] = train_variant(e, False, True, w)
    rows[f"captions + masks, unmasked_weight {unmasked_weight}"] = train_variant(e, True, True, unmasked_weight)
    plain = rows["plain"]
    table = ["| training photos | subject's look | subject + edit (mean of 7) | drift | "
             f"context leak: \"{PROMPT}\" shows the {tw.SHARED_CONTEXT} | leak halved, look kept |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| base model (no LoRA): the floor | | | | {pct(floor)} | |"]
    if hasattr(e, "lora"):  # the demo LoRA of section 2-3, when it ran in this process
        e.tag = "context-demo"
        d = e.demo
        table.append(f"| data/raj, the demo (2 of 6 photos in the {tw.SHARED_CONTEXT}, 4 elsewhere) | "
                     f"{pct(d['instance'])} | {pct(d['edits'])} | {pct(d['drift'])} | "
                     f"{pct(leak(e, e.model([(e.lora, 1.0)])))} | |")
    default = f", unmasked_weight {unmasked_weight}"
    for name, r in rows.items():
        label = "data/raj-city: " + name + (" (the default)" if name.endswith(default) else "")
        verdict = "" if r is plain else ("yes" if reached(r, plain) else "no")
        table.append(f"| {label} | {pct(r['look'])} | {pct(r['edits'])} | {pct(r['drift'])} | "
                     f"{pct(r['leak'])} | {verdict} |")
    verdicts = ", ".join(f"{name} {'yes' if reached(r, plain) else 'no'}"
                         for name, r in rows.items() if r is not plain)
    return "\n".join(table) + (
        f"\n\nAll six photos of data/raj-city share one {tw.SHARED_CONTEXT} background. Target: captions or "
        f"masks cut the plain run's leak at least in half (to <= {pct(LEAK_CUT * plain['leak'])}) with the "
        f"look at most {100 * LOOK_SLACK:.0f} points under plain's (>= {pct(plain['look'] - LOOK_SLACK)}): "
        f"{verdicts}.")
