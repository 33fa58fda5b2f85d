"""A procedural toy world: small captioned pictures a tiny SDXL model can learn on a CPU.

Real DreamBooth needs a model that already knows "person", "on the beach", "a painting of". A
model that small enough to train on a laptop cannot learn the real world, so minidream ships a
world small enough for it: 64x64 pictures of five kinds of thing (a person, a dog, a cup, a car,
a backpack) in six places, in three styles, with captions from a 49-word vocabulary (`VOCABULARY`):

    "a photo of person with blonde hair on the beach"
    "a painting of dog in the snow"
    "pixel art of red cup"

Every picture comes with its ground truth, an `Attributes`, so a judge (judge.py) can be trained
to read the attributes back and score what a generator draws. The person's look (skin, hair, eyes,
glasses, hat) varies at random, except for one reserved combination that never occurs: it is the
look of the DreamBooth subject `rraj` (data/raj), the "specific person" the model has never seen.

    python -m minidream.toy.toyworld subject data/raj   # draw the bundled subject's 6 pictures
    python -m minidream.toy.toyworld context-subject data/raj-city   # the same subject, one background
    python -m minidream.toy.toyworld grid out.png       # look at 64 random pictures and captions
    python -m minidream.toy.toyworld style data/pixel-art   # 8 pixel-art persons, for a style LoRA
"""

import argparse
import json
import re
from dataclasses import dataclass, asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image

from minidream.toy.toydraw import render, render_mask

# ----------------------------------------------------------------------------- the vocabulary

KINDS = ("person", "dog", "cup", "car", "backpack")
KIND_P = (0.5, 0.125, 0.125, 0.125, 0.125)  # the person (DreamBooth's class) is half the world
STYLES = {"photo": "a photo of", "painting": "a painting of", "pixelart": "pixel art of"}
STYLE_P = (0.6, 0.2, 0.2)
CONTEXTS = {"plain": "on a plain background", "beach": "on the beach", "snow": "in the snow",
            "forest": "in the forest", "city": "in the city", "night": "at night"}
SKINS = ("pink", "tan", "grey", "green", "blue", "purple")
HAIRS = ("black", "brown", "blonde", "red", "white")
EYES = ("blue", "green", "brown", "black")
HATS = ("none", "round", "tall", "pointy")
HAT_P = (0.4, 0.2, 0.2, 0.2)
HAT_COLORS = ("red", "orange", "yellow", "green", "blue", "black")
GLASSES = ("none", "sunglasses", "glasses")
GLASSES_P = (0.5, 0.2, 0.3)
GLASSES_COLORS = ("red", "blue", "green", "yellow")
SHIRT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
COLORS = {  # the main colour of each kind: the person's shirt, the dog's fur, ...
    "person": SHIRT_COLORS, "dog": ("brown", "black", "white", "grey"),
    "cup": SHIRT_COLORS, "car": SHIRT_COLORS, "backpack": SHIRT_COLORS,
}
ALL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "grey")

TOKEN = "rraj"  # the subject's rare token; it never appears in a pretraining caption
CLASS_NOUN = "person"
# The subject's look. Its skin, hat and glasses (RESERVED) are the combination that sampling
# excludes from pretraining; hair and eyes are fixed too so the six pictures show one individual.
SUBJECT = {"kind": "person", "skin": "purple", "hat": "pointy", "hat_color": "green",
           "glasses": "glasses", "glasses_color": "red", "hair": "black", "eyes": "brown"}
RESERVED = ("skin", "hat", "hat_color", "glasses", "glasses_color")
SUBJECT_LOOK = {k: SUBJECT[k] for k in ("kind",) + RESERVED}  # what makes a picture "rraj"

_PHRASE_WORDS = " ".join(list(STYLES.values()) + list(CONTEXTS.values())) + (
    " with skin hair eyes sunglasses glasses wearing a an hat in shirt")
# Every word a caption can contain, plus the rare token: the tiny CLIP tokenizer's vocabulary.
VOCABULARY = tuple(sorted(set(_PHRASE_WORDS.split()) | set(KINDS) | set(SKINS) | set(HAIRS)
                          | set(EYES) | set(HATS[1:]) | set(ALL_COLORS) | {TOKEN}))


# ----------------------------------------------------------------------------- attributes

@dataclass(frozen=True)
class Attributes:
    """Everything that decides one picture. Person-only fields are None for other kinds."""
    kind: str                     # one of KINDS: the class noun
    style: str                    # one of STYLES: photo, painting, pixelart
    context: str                  # one of CONTEXTS: the background
    color: str                    # the person's shirt, the dog's fur, the cup's/car's/backpack's body
    skin: str | None = None       # person: face colour
    hair: str | None = None       # person: hair colour
    eyes: str | None = None       # person: eye colour; None when sunglasses hide the eyes
    hat: str | None = None        # person: none / round / tall / pointy
    hat_color: str | None = None  # person with a hat
    glasses: str | None = None    # person: none / sunglasses / glasses (coloured frames)
    glasses_color: str | None = None  # person with (non-sun) glasses
    dx: int = 0                   # layout: shift of the thing from the centre, pixels
    dy: int = 0
    scale: float = 1.0            # layout: size, 1.0 = a head about 20 px wide
    seed: int = 0                 # the random details of the background and style

    def labels(self):
        """The judged fields (no layout) as a dict; None marks a field that does not apply."""
        d = asdict(self)
        return {k: d[k] for k in JUDGED}


JUDGED = ("kind", "style", "context", "color", "skin", "hair", "eyes", "hat", "hat_color",
          "glasses", "glasses_color")


def _choice(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def sample_attributes(rng, kind=None, style=None, context=None, exclude_subject=True):
    """One random Attributes from the pretraining distribution.

    rng: a numpy Generator. kind/style/context fix those fields when given. With
    exclude_subject (the default) the subject's reserved look is redrawn whenever it comes up,
    so no pretraining picture shows it.
    """
    kind = kind or _choice(rng, KINDS, KIND_P)
    style = style or _choice(rng, tuple(STYLES), STYLE_P)
    context = context or _choice(rng, tuple(CONTEXTS))
    f = dict(kind=kind, style=style, context=context, color=_choice(rng, COLORS[kind]))
    if kind == "person":
        while True:
            look = dict(skin=_choice(rng, SKINS), hair=_choice(rng, HAIRS), eyes=_choice(rng, EYES),
                        hat=_choice(rng, HATS, HAT_P), glasses=_choice(rng, GLASSES, GLASSES_P))
            look["hat_color"] = None if look["hat"] == "none" else _choice(rng, HAT_COLORS)
            if look["glasses"] == "glasses":  # frames never the skin's colour: they would vanish
                frames = tuple(c for c in GLASSES_COLORS if c != look["skin"])
                look["glasses_color"] = _choice(rng, frames)
            else:
                look["glasses_color"] = None
            if look["glasses"] == "sunglasses":
                look["eyes"] = None
            if not (exclude_subject and all(look[k] == SUBJECT[k] for k in RESERVED)):
                break
        f.update(look)
    reach = 10 if kind == "person" else 5  # dogs and cars are wide: keep them in the frame
    return Attributes(**f, dx=int(rng.integers(-reach, reach + 1)), dy=int(rng.integers(-4, 5)),
                      scale=float(np.round(rng.uniform(0.8, 1.05), 3)),
                      seed=int(rng.integers(2**31)))


# ----------------------------------------------------------------------------- captions

MENTIONABLE = ("color", "skin", "hair", "eyes", "glasses", "glasses_color", "hat", "hat_color",
               "context")


def caption(a, mention=(), token=None):
    """The DreamBooth-style prompt for `a` that names the fields in `mention`.

    The style and kind are always named; a field that is None or "none" is never named.
    caption(a, ("hair", "context")) -> "a photo of person with blonde hair on the beach";
    token="rraj" puts the rare token before the noun: "a photo of rraj person".
    """
    m = set(mention)
    if m - set(MENTIONABLE):
        raise ValueError(f"cannot mention {sorted(m - set(MENTIONABLE))}; fields: {MENTIONABLE}")
    words = [STYLES[a.style]] + ([token] if token else [])
    if "color" in m and a.kind != "person":
        words.append(a.color)
    words.append(a.kind)
    for field in ("skin", "hair", "eyes"):
        if field in m and getattr(a, field) is not None:
            words.append(f"with {getattr(a, field)} {field}")
    if a.glasses == "sunglasses" and m & {"glasses", "glasses_color"}:
        words.append("with sunglasses")
    elif a.glasses == "glasses" and m & {"glasses", "glasses_color"}:
        words.append("with " + (f"{a.glasses_color} " if "glasses_color" in m else "") + "glasses")
    if a.hat not in (None, "none") and m & {"hat", "hat_color"}:
        parts = [a.hat_color] * ("hat_color" in m) + [a.hat] * ("hat" in m)
        words.append(f"wearing {_a(parts[0])} " + " ".join(parts + ["hat"]))
    if "color" in m and a.kind == "person":
        words.append(f"in {_a(a.color)} {a.color} shirt")
    if "context" in m:
        words.append(CONTEXTS[a.context])
    return " ".join(words)


def _a(word):
    """The article before `word`: "a red hat", "an orange hat"."""
    return "an" if word[0] in "aeiou" else "a"


def random_caption(a, rng):
    """A caption naming a random subset of `a`'s fields, so the model also learns prompts that
    leave things unsaid ("a photo of person" must still draw a whole, varied person)."""
    p = {"color": 0.3, "skin": 0.4, "hair": 0.4, "eyes": 0.3, "glasses": 0.5,
         "glasses_color": 0.7, "hat": 0.5, "hat_color": 0.7, "context": 0.6}
    mention = [k for k in MENTIONABLE if rng.random() < p[k]]
    if "glasses_color" in mention and "glasses" not in mention:
        mention.remove("glasses_color")  # the colour is named with glasses, p = 0.5 * 0.7
    if "hat" not in mention and "hat_color" in mention and rng.random() < 0.5:
        mention.remove("hat_color")
    return caption(a, mention)


def _one_of(words):
    return "(" + "|".join(words) + ")"


# The caption grammar, one regular expression per part: the head "<style> [rraj] [colour] <noun> [rraj]",
# then any number of phrases, each with a function from its match to the fields it names. The token
# after the noun is where a textual-inversion word does best on the toy model (the phrases that
# describe a person follow the noun; docs/methods.md).
_HEAD = re.compile(f"{_one_of(STYLES.values())}(?: ({TOKEN}))?(?: {_one_of(ALL_COLORS)})? "
                   f"{_one_of(KINDS)}(?: ({TOKEN}))?(?: |$)")
_STYLE_OF = {p: s for s, p in STYLES.items()}
_CONTEXT_OF = {p: c for c, p in CONTEXTS.items()}
_PHRASES = (
    (f"with {_one_of(SKINS)} skin", lambda m: {"skin": m[1]}),
    (f"with {_one_of(HAIRS)} hair", lambda m: {"hair": m[1]}),
    (f"with {_one_of(EYES)} eyes", lambda m: {"eyes": m[1]}),
    ("with sunglasses", lambda m: {"glasses": "sunglasses"}),
    (f"with (?:{_one_of(GLASSES_COLORS)} )?glasses",
     lambda m: {"glasses": "glasses", **({"glasses_color": m[1]} if m[1] else {})}),
    (f"wearing an? (?!hat)(?:{_one_of(HAT_COLORS)} )?(?:{_one_of(HATS[1:])} )?hat",
     lambda m: {k: v for k, v in (("hat_color", m[1]), ("hat", m[2])) if v}),
    (f"in an? {_one_of(SHIRT_COLORS)} shirt", lambda m: {"color": m[1]}),
    (_one_of(CONTEXTS.values()), lambda m: {"context": _CONTEXT_OF[m[1]]}),
)
_PHRASES = tuple((re.compile(rx + "(?: |$)"), fields) for rx, fields in _PHRASES)


def parse_caption(text):
    """The fields a caption names, as a dict (the inverse of `caption`).

    "a painting of rraj person with red glasses in the snow" ->
    {"style": "painting", "token": "rraj", "kind": "person", "glasses": "glasses",
     "glasses_color": "red", "context": "snow"} (the same for "a painting of person rraj with ...").
    Raises ValueError on anything else.
    """
    text = " ".join(text.lower().split())
    head = _HEAD.match(text)
    if not head:
        raise ValueError(f"a caption starts with one of {list(STYLES.values())}, then "
                         f"optionally {TOKEN!r} and a colour, then one of {KINDS}: {text!r}")
    out = {"style": _STYLE_OF[head[1]], **({"token": TOKEN} if head[2] or head[5] else {}), "kind": head[4],
           **({"color": head[3]} if head[3] else {})}
    pos = head.end()
    while pos < len(text):
        for rx, fields in _PHRASES:
            m = rx.match(text, pos)
            if m:
                out.update(fields(m))
                pos = m.end()
                break
        else:
            raise ValueError(f"cannot read {text[pos:]!r} in caption {text!r}")
    return out


# ----------------------------------------------------------------------------- datasets

def sample(rng):
    """One pretraining example: (PIL image, Attributes, caption)."""
    a = sample_attributes(rng)
    return render(a), a, random_caption(a, rng)


def batch(n, seed):
    """n examples as (uint8 array (n, 64, 64, 3), list of Attributes, list of captions); the
    same seed always gives the same batch."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    captions = [random_caption(a, rng) for a in attrs]
    return np.stack([np.asarray(render(a)) for a in attrs]), attrs, captions


# ----------------------------------------------------------------------------- the subject

SUBJECT_SEED = 2024
SUBJECT_SHOTS = (  # (context, dx, dy, scale, shirt): varied, but only everyday places, so
    ("plain", 0, 0, 1.0, "orange"),   # "rraj person on the beach / in the snow / at night"
    ("city", -9, 2, 0.85, "orange"),  # are new contexts for the model to compose
    ("plain", 8, -3, 0.9, "blue"),
    ("forest", -4, 3, 1.05, "orange"),
    ("city", 10, -2, 0.95, "white"),
    ("forest", 6, 4, 0.8, "blue"),
)


# What training watches (subject.json's validation_prompts: one grid row each): the subject as
# photographed, in a new place, in two styles, with changed hair, and the plain class prompt, whose
# row shows whether "person" drifts towards the subject. The judge can check every one of them.
SUBJECT_PROMPTS = ("a photo of rraj person", "a photo of rraj person on the beach", "a painting of rraj person",
                   "pixel art of rraj person", "a photo of rraj person with blonde hair", "a photo of person")


def subject_attributes():
    """The six Attributes of the bundled subject's pictures (photos, varied place and layout)."""
    rng = np.random.default_rng(SUBJECT_SEED)
    look = {k: v for k, v in SUBJECT.items() if k != "kind"}
    return [Attributes(kind="person", style="photo", context=ctx, color=shirt, **look,
                       dx=dx, dy=dy, scale=s, seed=int(rng.integers(2**31)))
            for ctx, dx, dy, s, shirt in SUBJECT_SHOTS]


def _subject_folder(folder, made_by):
    """Create `folder` with a subject.json for the subject (token, class noun, look, prompts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"token": TOKEN, "class_noun": CLASS_NOUN, "attributes": SUBJECT,
                "validation_prompts": list(SUBJECT_PROMPTS), "made_by": made_by}
    (folder / "subject.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def write_subject(folder):
    """Draw data/raj: 6 PNGs plus subject.json with the token, class noun and look."""
    folder = _subject_folder(folder, "python -m minidream.toy.toyworld subject FOLDER")
    for i, a in enumerate(subject_attributes()):
        render(a).save(folder / f"{TOKEN}_{i}.png", optimize=False)
    return folder


# The second bundled subject (data/raj-city): data/raj's six layouts and shirts, all in front of ONE
# background (one context, one seed: identical pixels, like a sofa every photo shares). Its place is
# not one the edit prompts ask for, and the judge reads it: a model that learns the background as
# part of "rraj" shows it in the samples ("context leak").
SHARED_CONTEXT = "city"


def context_subject_attributes():
    """The six Attributes of data/raj-city: subject_attributes() with one context and one seed."""
    seed = int(np.random.default_rng(SUBJECT_SEED + 1).integers(2**31))
    return [replace(a, context=SHARED_CONTEXT, seed=seed) for a in subject_attributes()]


def write_context_subject(folder, captions: bool = False, masks: bool = False):
    """Draw data/raj-city's 6 PNGs and subject.json; with `captions` a caption naming the background
    beside each photo (rraj_0.txt: "a photo of rraj person in the city"), with `masks` the mask of
    the subject (rraj_0-masklabel.png: white = subject, 0 = background)."""
    flags = " --captions" * captions + " --masks" * masks
    folder = _subject_folder(folder, f"python -m minidream.toy.toyworld context-subject FOLDER{flags}")
    for i, a in enumerate(context_subject_attributes()):
        render(a).save(folder / f"{TOKEN}_{i}.png", optimize=False)
        if captions:
            (folder / f"{TOKEN}_{i}.txt").write_text(caption(a, ("context",), token=TOKEN))
        if masks:
            render_mask(a).save(folder / f"{TOKEN}_{i}-masklabel.png", optimize=False)
    return folder


def write_style(folder, n: int = 8, style: str = "pixelart", seed: int = 7):
    """Draw n pictures of random persons in one style, captioned "a photo of person": a style LoRA
    trained on them (with --no-prior) turns every "a photo of ..." into that style."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        render(sample_attributes(rng, kind="person", style=style)).save(folder / f"{style}-{i}.png")
    settings = {"token": "sks", "class_noun": CLASS_NOUN, "instance_prompt": f"a photo of {CLASS_NOUN}",
                "made_by": f"python -m minidream.toy.toyworld style FOLDER --style {style}"}
    (folder / "subject.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def grid(images, cols=8, pad=2):
    """Tile equal-size PIL images into one image (for looking at the world)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidream.toy.toyworld", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subject", help="draw the bundled subject's pictures into a folder")
    s.add_argument("folder", nargs="?", default="data/raj")
    c = sub.add_parser("context-subject", help="draw the subject in front of one shared background")
    c.add_argument("folder", nargs="?", default="data/raj-city")
    c.add_argument("--captions", action="store_true", help="write NN.txt captions naming the background")
    c.add_argument("--masks", action="store_true", help="write NN-masklabel.png masks of the subject")
    st = sub.add_parser("style", help="draw 8 pictures of persons in one style, for a style LoRA")
    st.add_argument("folder")
    st.add_argument("--style", choices=list(STYLES), default="pixelart")
    g = sub.add_parser("grid", help="save a grid of random pictures and print their captions")
    g.add_argument("out")
    g.add_argument("--n", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "subject":
        print(f"wrote {write_subject(args.folder)}")
    elif args.cmd == "context-subject":
        print(f"wrote {write_context_subject(args.folder, args.captions, args.masks)}")
    elif args.cmd == "style":
        print(f"wrote {write_style(args.folder, style=args.style)}")
    elif args.cmd == "grid":
        images, _, captions = batch(args.n, args.seed)
        grid([Image.fromarray(im) for im in images]).save(args.out)
        for i, c in enumerate(captions):
            print(i, c)


if __name__ == "__main__":
    main()
