"""What to evaluate: the targets (a LoRA and the subject it learned), the settings, the prompts.

A target comes from a training run folder (its config.json says the subject, token, base model and
resolution) or from a LoRA file and a subject folder (token and class noun from the metadata
minidream writes into the file, else from the folder's subject.json); no LoRA at all evaluates the
base model. prompt_set() is what every (sampler, steps) row samples: the 25 DreamBooth prompts of
the subject's kind (eval_prompts.py) or the user's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from minidream.config import LORA_FILE
from minidream.data import Subject, load_subject
from minidream.errors import UserError
from minidream.eval.eval_prompts import custom_prompts, dreambooth_prompts


class EvalError(UserError):
    """A run folder, LoRA or flag the evaluation cannot use; the message says what to pass instead."""


@dataclass
class Target:
    """One LoRA to evaluate and the subject it learned."""

    label: str  # names its output folder and its rows ("prior", "no-prior", the run's name)
    lora: Path | None  # None: the base model alone (a baseline)
    subject: Subject  # photos, token, class noun, class prompt
    model: str | None = None  # the base model it was trained on (None: minidream's default)
    vae: str | None = None
    tokenizer: str | None = None
    prior: bool | None = None  # trained with prior preservation? (None: unknown)
    guidance_scale: float | None = None  # the run's, used unless --guidance-scale is given
    size: int | None = None  # the run's training resolution


@dataclass
class Settings:
    """How every target is evaluated (the flags of python -m minidream.eval.evaluate)."""

    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    steps: list[int] = field(default_factory=lambda: [50])
    images_per_prompt: int = 4  # the paper: 4
    class_images: int = 16  # class-prompt samples for PRES
    seed: int = 0  # image j of every prompt uses seed + j
    guidance_scale: float | None = None  # None: the run's, else 5.0
    size: int | None = None  # None: the run's resolution, else the model's
    prompts: list[str] | None = None  # None: the 25 DreamBooth prompts
    limit: int | None = None  # only the first N prompts (quick runs)
    kind: str | None = None  # "live" | "object" (None: from the class noun)
    batch_size: int = 1  # images per sampler call (results do not depend on it)
    div: str = "dino"  # "dino" | "lpips"


def lora_metadata(path: Path) -> dict[str, str]:
    """The string metadata minidream writes into a LoRA file (token, class_noun, base_model, ...)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def target_from_run(run: Path, label: str | None = None, subject: str | None = None) -> Target:
    """A training run folder: config.json (TrainConfig's fields) + the final LoRA file."""
    config_file, lora = run / "config.json", run / LORA_FILE
    if not config_file.is_file() or not lora.is_file():
        raise EvalError(f"{run} is not a finished run folder (it needs config.json and {LORA_FILE}); "
                        f"pass a run folder, or --lora FILE --subject DIR")
    cfg = json.loads(config_file.read_text())
    return Target(
        label=label or run.name, lora=lora,
        subject=load_subject(subject or cfg["subject"], cfg.get("token"), cfg.get("class_noun"),
                             cfg.get("instance_prompt"), cfg.get("class_prompt")),
        model=cfg.get("model"), vae=cfg.get("vae"), tokenizer=cfg.get("tokenizer"), prior=cfg.get("prior"),
        guidance_scale=cfg.get("guidance_scale"), size=cfg.get("resolution"),
    )


def target_from_lora(lora: Path | None, subject: str | None, label: str | None = None, token=None,
                     class_noun=None, prior: bool | None = None) -> Target:
    """A LoRA file (or None: the base model) and the subject folder; token and class noun default
    to the ones minidream wrote into the file's metadata, then to the folder's subject.json."""
    if subject is None:
        raise EvalError("evaluating a LoRA file needs the subject's photos: pass --subject DIR")
    meta = lora_metadata(lora) if lora else {}
    return Target(label=label or (lora.stem if lora else "base"), lora=lora, prior=prior,
                  subject=load_subject(subject, token or meta.get("token") or None,
                                       class_noun or meta.get("class_noun") or None),
                  model=meta.get("base_model") or None)


def target(path: str, subject: str | None, label: str | None = None, prior: bool | None = None) -> Target:
    """A run folder or a LoRA file, as the command line names it; `prior` (from --prior / --no-prior)
    must agree with what the run's config.json says."""
    p = Path(path)
    if p.is_dir():
        t = target_from_run(p, label, subject)
        if prior is not None and t.prior is not None and t.prior != prior:
            raise EvalError(f"{p}/config.json says prior={t.prior}, but it was passed as "
                            f"--{'prior' if prior else 'no-prior'}: swap the two runs")
        t.prior = prior if prior is not None else t.prior
        return t
    if not p.is_file():
        raise EvalError(f"{p} is neither a run folder nor a LoRA file")
    return target_from_lora(p, subject, label, prior=prior)


def prompt_set(t: Target, s: Settings) -> list[str]:
    """The prompts every (sampler, steps) row samples for `t`: the user's, or the DreamBooth set of its kind."""
    subject = t.subject
    if s.prompts:
        prompts = custom_prompts(s.prompts, subject.token, subject.class_noun)
    else:
        prompts = dreambooth_prompts(subject.token, subject.class_noun, s.kind)
    return prompts[: s.limit] if s.limit else prompts
