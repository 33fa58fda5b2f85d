"""The DreamBooth evaluation prompts (Ruiz et al. 2022, sec. 4.1 and supplementary Figure 10).

25 prompts per subject: for objects 20 recontextualizations + 5 property changes, for live
subjects (pets) 10 recontextualizations + 10 accessorizations + 5 property changes. The list is the
one published with the paper's dataset (google/dreambooth, dataset/prompts_and_classes.txt, CC BY
4.0). "{}" stands for "[V] [class noun]", e.g. "rraj dog".
"""

from __future__ import annotations

from pathlib import Path

from minidream.errors import UserError

_SHARED_CONTEXTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_PROPERTIES = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")

OBJECT_PROMPTS = _SHARED_CONTEXTS + (
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
) + _PROPERTIES

LIVE_PROMPTS = _SHARED_CONTEXTS + (
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
) + _PROPERTIES

# The paper's live subjects are dogs and cats; people and other animals wear hats and outfits too.
LIVE_NOUNS = frozenset("""
    dog cat puppy kitten pet person man woman boy girl child kid baby guy lady
    horse bird parrot rabbit bunny hamster fox monkey
""".split())
NOT_ALIVE = frozenset("toy stuffed plush plushie statue figurine robot cartoon".split())  # "stuffed dog" is an object


def subject_kind(class_noun: str) -> str:
    """"live" when the class noun names a person or an animal (its last word), else "object"."""
    words = class_noun.lower().split()
    alive = bool(words) and words[-1] in LIVE_NOUNS and not NOT_ALIVE & set(words)
    return "live" if alive else "object"


def dreambooth_prompts(token: str, class_noun: str, kind: str | None = None) -> list[str]:
    """The 25 prompts for this subject, with "[V] [class noun]" filled in."""
    kind = kind or subject_kind(class_noun)
    if kind not in ("live", "object"):
        raise ValueError(f"kind must be 'live' or 'object', got {kind!r}")
    templates = LIVE_PROMPTS if kind == "live" else OBJECT_PROMPTS
    return [t.format(f"{token} {class_noun}") for t in templates]


def custom_prompts(values: list[str], token: str, class_noun: str) -> list[str]:
    """--prompts: literal prompts, or a text file with one per line; "{}" becomes "[V] [class noun]"."""
    prompts = []
    for value in values:
        if value.endswith(".txt") and Path(value).is_file():
            prompts += [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
        else:
            prompts.append(value)
    if not prompts:
        raise UserError("--prompts gave no prompts: pass prompts or a .txt file with one prompt per line")
    return [p.replace("{}", f"{token} {class_noun}") for p in prompts]
