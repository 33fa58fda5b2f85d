"""Scoring generated toy-world pictures with the judge: does the picture show what the prompt says?

DreamBooth's paper measures subject fidelity with CLIP-I / DINO similarity to the real photos,
prompt fidelity with CLIP-T, language drift with PRES and diversity with DIV (Ruiz et al. 2022,
sec. 4.1 and 4.3). Those need pretrained CLIP and DINO networks (minidream/eval/metrics.py loads them
when they are downloaded). The toy world has exact labels instead, so the judge (judge.py) answers the same
questions directly:

    subject fidelity   share of samples that show the subject's look (toyworld.SUBJECT_LOOK)
    prompt fidelity    share of samples whose judged fields equal the ones the prompt names
    drift (PRES idea)  share of plain class-prompt samples that show the subject's look
    diversity (DIV)    mean share of a person's judged fields that differ between two samples
"""

from __future__ import annotations

import itertools

import numpy as np

from minidream.pipeline import generate
from minidream.samplers import ddim
from minidream.toy import toyworld as tw
from minidream.toy.judge import HEADS, PERSON_ONLY

PERSON_FIELDS = PERSON_ONLY  # skin, hair, eyes, hat, hat_color, glasses, glasses_color


def sample_images(model, prompts: list[str], seed: int = 0, *, steps: int = 20, sampler=ddim,
                  guidance_scale: float = 5.0, chunk: int = 64):
    """One image per prompt, `chunk` prompts per sampler run (chunk i uses seed + i), as PIL images."""
    images = []
    for i in range(0, len(prompts), chunk):
        images += generate(model, prompts[i:i + chunk], sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                           seed=seed + i // chunk, progress=False)
    return images


def named_fields(prompt: str) -> dict[str, str]:
    """The judged fields a prompt names ("a painting of dog in the snow" -> style, kind, context)."""
    return {k: v for k, v in tw.parse_caption(prompt).items() if k in HEADS}


def prompt_agreement(judge, images, prompts) -> dict[str, float]:
    """How well samples follow their prompts.

    fields: share of all (image, named field) pairs the judge sees right; images: share of images
    with every named field right; plus one share per field name.
    """
    per_field: dict[str, list[bool]] = {}
    whole = []
    for seen, prompt in zip(judge.predict(images), prompts):
        checks = {k: seen[k] == v for k, v in named_fields(prompt).items()}
        for k, ok in checks.items():
            per_field.setdefault(k, []).append(ok)
        whole.append(all(checks.values()))
    flat = [ok for oks in per_field.values() for ok in oks]
    out = {"fields": float(np.mean(flat)), "images": float(np.mean(whole))}
    return out | {k: float(np.mean(v)) for k, v in per_field.items()}


def shows(judge, images, wanted: dict[str, str]) -> float:
    """Share of images in which the judge sees every field of `wanted`."""
    return judge.score(images, wanted)


def subject_fidelity(judge, images, prompt: str | None = None) -> float:
    """Share of images with the subject's look and, if a prompt is given, the fields it names
    (its context, style, hair, ...) other than the subject's own."""
    wanted = dict(tw.SUBJECT_LOOK)
    if prompt is not None:
        wanted |= {k: v for k, v in named_fields(prompt).items() if k not in wanted}
    return judge.score(images, wanted)


def subject_marks(judge, images) -> dict[str, float]:
    """Share of images showing each of the subject's marks on its own (skin, hat, hat colour,
    glasses, glasses colour): which part of the look a model gets right, and which it misses."""
    checks = judge.check(images, {k: v for k, v in tw.SUBJECT_LOOK.items() if k != "kind"})
    return {k: float(np.mean([c[k] for c in checks])) for k in checks[0]}


def attribute_diversity(judge, images) -> float:
    """DIV idea without LPIPS: over all pairs of samples judged to be persons, the mean share of the
    person fields (skin, hair, eyes, hat, hat colour, glasses, glasses colour) that differ. 0 when
    every sample looks the same; two independent pretraining persons differ in about 0.7 of them."""
    looks = [tuple(p[k] for k in PERSON_FIELDS) for p in judge.predict(images) if p["kind"] == "person"]
    pairs = list(itertools.combinations(looks, 2))
    if not pairs:
        return 0.0
    return float(np.mean([np.mean([x != y for x, y in zip(a, b)]) for a, b in pairs]))


def world_prompts(n: int, seed: int) -> list[str]:
    """n captions drawn as in pretraining (random things, each naming a random subset of its fields)."""
    rng = np.random.default_rng(seed)
    return [tw.random_caption(tw.sample_attributes(rng), rng) for _ in range(n)]
