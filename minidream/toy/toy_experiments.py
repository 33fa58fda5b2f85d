"""Measured DreamBooth on a CPU: the toy world's answers to DreamBooth's questions, in one command.

    python -m minidream.toy.toy_experiments   # 11 LoRAs, a full fine-tune, 2 textual inversions -> benchmarks/TOY_WORLD.md
    python -m minidream.toy.toy_experiments --only 8   # one section: only its text in the file changes

Every LoRA is trained by the code behind `python train.py --subject data/raj` (training.train with
the bundled tiny model's demo settings), and every number is a share of samples in which the toy
world's judge sees what it should (toy_eval.py). The sections:

  1. the pretrained base model follows prompts; it does not know the subject;
  2. the demo run: the subject's look for "a photo of rraj person", and for prompts that put it in a new
     place, style, hair colour or shirt (the paper's recontextualisation, art renditions, property modification);
  3. prior preservation on / off: does "a photo of person" drift towards the subject (the paper's PRES idea),
     does it stay diverse (DIV idea)?
  4. how many instance images: 1, 3 or 6;
  5. the sampler: DDIM vs PNDM at 50 and 80 steps (the demo samples with DDIM, 20 steps);
  6. merging the subject LoRA with a "pixel art" style LoRA trained on toy pixel-art pictures;
  7. the other methods (--method full, --method textual-inversion, the word before or after the noun);
  8. context leak (context_experiment.py): do captions, masks or both keep a shared background out of "rraj"?
  9. the demo on an int8 / nf4 base (base_weights_experiment.py);
 10. class images and validation from DPM-Solver++ at 10-20 steps vs DDIM at 20-50 (sampler_experiment.py);
 11. LoRA, DoRA, pivotal tuning, LoRA + EMA and textual inversion, with what the model still knows
     (methods_experiment.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minidream import formats, training
from minidream.config import LORA_FILE, PRESETS, TrainConfig
from minidream.data import load_subject
from minidream.formats.lora_files import add_loras
from minidream.methods.registry import method_class
from minidream.methods.textual_inversion import load_embedding, name_the_word
from minidream.formats.models import BUNDLED_MODEL, REPO, load_model
from minidream.drawing import labelled_grid
from minidream.more_samplers import SAMPLERS
from minidream.samplers import ddim, pndm
from minidream.toy import toy_eval as te, toyworld as tw
from minidream.toy.base_weights_experiment import quantised_base
from minidream.toy.context_experiment import context_leak, pct
from minidream.toy.judge import Judge
from minidream.toy.pretrain import RECORD
from minidream.toy.methods_experiment import AFTER_THE_NOUN, after_the_noun, methods_now
from minidream.toy.sampler_experiment import fewer_steps

INSTANCE = "a photo of rraj person"
CLASS = "a photo of person"
EDITS = (  # (what the prompt asks for, prompt): each keeps the subject and changes one thing
    ("place", "a photo of rraj person on the beach"),
    ("place", "a photo of rraj person in the snow"),
    ("place", "a photo of rraj person at night"),
    ("style", "a painting of rraj person"),
    ("style", "pixel art of rraj person"),
    ("property", "a photo of rraj person with blonde hair"),
    ("outfit", "a photo of rraj person in a red shirt"),
)


def setting(default, help: str):
    """A Settings field and its --help text, written once."""
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    out: str = setting("runs/toy-experiments", "folder for run folders, class images and sample grids")
    results: str = setting("benchmarks/TOY_WORLD.md", "markdown file to write")
    samples: int = setting(32, "images per prompt, each with its own seed")
    seed: int = setting(1000, "seed of the first sample batch (training runs use seed 0, as train.py does)")
    threads: int = setting(1, "torch CPU threads for sampling")
    steps: int | None = setting(None, "training steps (None: the demo's), for quick checks")
    only: str = setting("", "run only these sections (8, or 1,2,5) and replace just their text in the results file")
    variants: str = setting("", "section 11: measure only these variants (methods_experiment.VARIANTS, comma-separated)")


class Experiments:
    """Holds the judge, the output folder and the timings; one method per section."""

    def __init__(self, s: Settings):
        self.s, self.out, self.model_path = s, Path(s.out), REPO / BUNDLED_MODEL
        self.judge = Judge.load(REPO / "weights" / "toy-judge.safetensors")
        self.notes: list[str] = []

    def model(self, loras=(), path=None):
        model = load_model(path or self.model_path)
        if loras:
            add_loras(model, list(loras))
        return model

    def images(self, model, prompt: str, n: int | None = None, **kw):
        n = n or self.s.samples
        images = te.sample_images(model, [prompt] * n, seed=self.s.seed, **kw)
        name = prompt.replace(" ", "-") + "".join(f"-{k}{getattr(v, '__name__', v)}" for k, v in kw.items())
        tw.grid(images[:32], cols=8).save(self.out / "grids" / f"{self.tag}-{name}.png")
        return images

    def train(self, name: str, subject: Path, **overrides) -> Path:
        overrides = {"steps": self.s.steps, **overrides} if self.s.steps else overrides
        start = time.perf_counter()
        cfg = TrainConfig(subject=str(subject), out=str(self.out / "runs"), score=False, **overrides)
        run = training.train(cfg, method_class(cfg), models=formats, sampler_table=SAMPLERS)
        self.seconds = time.perf_counter() - start
        self.notes.append(f"{name}: trained in {self.seconds:.0f} s ({run.name})")
        return run / LORA_FILE

    def subset(self, k: int) -> Path:
        """A subject folder with the first k pictures of data/raj."""
        folder = self.out / "subjects" / f"raj-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in sorted((REPO / "data" / "raj").glob("*.png"))[:k]:
            shutil.copy(p, folder / p.name)
        shutil.copy(REPO / "data" / "raj" / "subject.json", folder / "subject.json")
        return folder

    def subject_rows(self, model, name_the_subject=str, **sampling) -> dict[str, float]:
        """Subject fidelity for the instance prompt; subject + edit for every EDITS prompt. The model is
        given name_the_subject(prompt) (textual inversion learns a word of its own)."""
        images = self.images(model, name_the_subject(INSTANCE), **sampling)
        row = {"instance": te.subject_fidelity(self.judge, images), "marks": te.subject_marks(self.judge, images)}
        for _, prompt in EDITS:
            row[prompt] = te.subject_fidelity(self.judge, self.images(model, name_the_subject(prompt), **sampling), prompt)
        row["edits"] = float(np.mean([row[p] for _, p in EDITS]))
        return row

    def drift(self, model, **sampling) -> dict[str, float]:
        images = self.images(model, CLASS, **sampling)
        return {"drift": te.subject_fidelity(self.judge, images), "person": te.shows(self.judge, images, {"kind": "person"}),
                "div": te.attribute_diversity(self.judge, images)}

    # -- the sections

    def base(self) -> str:
        self.tag = "base"
        model = self.model()
        prompts = te.world_prompts(4 * self.s.samples, seed=self.s.seed)
        agree = te.prompt_agreement(self.judge, te.sample_images(model, prompts, seed=self.s.seed), prompts)
        kinds = {k: te.shows(self.judge, self.images(model, f"a photo of {k}"), {"kind": k}) for k in tw.KINDS}
        d = self.drift(model)
        instance = self.images(model, INSTANCE)
        subject, self.base_marks = te.subject_fidelity(self.judge, instance), te.subject_marks(self.judge, instance)
        rows = [
            f"| {len(prompts)} captions drawn like the pretraining ones | every named field right in "
            f"{pct(agree['images'])} of images; {pct(agree['fields'])} of named fields |",
            "| per field | " + ", ".join(f"{k} {pct(v)}" for k, v in agree.items() if k not in ("fields", "images")) + " |",
            "| \"a photo of {kind}\" shows that kind | " + ", ".join(f"{k} {pct(v)}" for k, v in kinds.items()) + " |",
            f"| \"{CLASS}\": a person / diversity (DIV) | {pct(d['person'])} / {d['div']:.2f} |",
            f"| \"{INSTANCE}\" shows the subject (never seen) | {pct(subject)} |",
        ]
        self.base_div, self.base_agreement = d["div"], agree
        return "\n".join(["| base model (no LoRA) | judge |", "| --- | --- |", *rows])

    def demo_and_prior(self) -> str:
        self.tag = "prior"
        self.lora = self.train("demo (prior on)", REPO / "data" / "raj")
        self.demo_seconds = self.seconds
        self.demo = with_prior = self.subject_rows(model := self.model([(self.lora, 1.0)])) | self.drift(model)
        self.tag = "no-prior"
        lora = self.train("no prior", REPO / "data" / "raj", prior=False)
        without = self.subject_rows(model := self.model([(lora, 1.0)])) | self.drift(model)
        head = ["| prompt | prior on | prior off |", "| --- | --- | --- |",
                f"| \"{INSTANCE}\": the subject's look | {pct(with_prior['instance'])} | {pct(without['instance'])} |"]
        for mark, share in with_prior["marks"].items():
            head.append(f"| ... of which {mark} {tw.SUBJECT[mark]} (base model {pct(self.base_marks[mark])}) | "
                        f"{pct(share)} | {pct(without['marks'][mark])} |")
        for what, prompt in EDITS:
            head.append(f"| \"{prompt}\": subject + {what} | {pct(with_prior[prompt])} | {pct(without[prompt])} |")
        head += [f"| mean over the {len(EDITS)} edits | {pct(with_prior['edits'])} | {pct(without['edits'])} |",
                 f"| drift: \"{CLASS}\" shows the subject (lower is better) | {pct(with_prior['drift'])} | "
                 f"{pct(without['drift'])} |",
                 f"| \"{CLASS}\" diversity (DIV; base model {self.base_div:.2f}) | {with_prior['div']:.2f} | "
                 f"{without['div']:.2f} |"]
        return "\n".join(head)

    def instance_images(self) -> str:
        rows = ["| instance images | subject's look | subject + edit (mean of 7) | drift |", "| --- | --- | --- | --- |"]
        for k in (1, 3):
            self.tag = f"images-{k}"
            lora = self.train(f"{k} instance image(s)", self.subset(k))
            r = self.subject_rows(model := self.model([(lora, 1.0)])) | self.drift(model)
            rows.append(f"| {k} | {pct(r['instance'])} | {pct(r['edits'])} | {pct(r['drift'])} |")
        d = self.demo
        rows.append(f"| 6 (the demo) | {pct(d['instance'])} | {pct(d['edits'])} | {pct(d['drift'])} |")
        return "\n".join(rows)

    def samplers(self) -> str:
        self.tag = "samplers"
        model = self.model([(self.lora, 1.0)])
        rows = ["| sampler | steps | subject's look | subject + edit (mean of 7) | s / image |", "| --- | --- | --- | --- | --- |"]
        for sampler, steps in ((ddim, 20), (ddim, 50), (ddim, 80), (pndm, 50), (pndm, 80)):
            start = time.perf_counter()
            look = te.subject_fidelity(self.judge, self.images(model, INSTANCE, sampler=sampler, steps=steps))
            edits = [te.subject_fidelity(self.judge, self.images(model, p, sampler=sampler, steps=steps), p)
                     for _, p in EDITS]
            seconds = (time.perf_counter() - start) / ((1 + len(EDITS)) * self.s.samples)
            rows.append(f"| {sampler.__name__.upper()} | {steps} | {pct(look)} | {pct(float(np.mean(edits)))} | {seconds:.3f} |")
        return "\n".join(rows)

    def merging(self) -> str:
        # 8 toy pixel-art pictures of random persons, for a style LoRA trained as "a photo of person"
        style = self.train("pixel-art style LoRA", tw.write_style(self.out / "subjects" / "pixel-art"), prior=False)
        rows = ["| adapters (scale) | prompt | subject's look | pixel art | both |", "| --- | --- | --- | --- | --- |"]
        cases = ((((self.lora, 1.0),), "pixel art of rraj person"), (((self.lora, 1.0),), INSTANCE),
                 (((style, 1.0),), CLASS), (((self.lora, 1.0), (style, 1.0)), INSTANCE),
                 (((self.lora, 1.0), (style, 0.5)), INSTANCE))
        for loras, prompt in cases:
            parts = [("subject" if p == self.lora else "style", w) for p, w in loras]
            names = " + ".join(f"{who} ({w:g})" for who, w in parts)
            self.tag = "merge-" + "-".join(f"{who}{w:g}" for who, w in parts)
            images = self.images(self.model(loras), prompt)
            rows.append(f"| {names} | \"{prompt}\" | {pct(te.subject_fidelity(self.judge, images))} | "
                        f"{pct(te.shows(self.judge, images, {'style': 'pixelart'}))} | "
                        f"{pct(te.subject_fidelity(self.judge, images, 'pixel art of rraj person'))} |")
        return "\n".join(rows)

    def methods(self) -> str:
        """LoRA vs full fine-tuning vs textual inversion on the same subject, demo settings each."""
        rows = ["| method | what it writes | size | train s | subject's look | subject + edit (mean of 7) | drift |",
                "| --- | --- | --- | --- | --- | --- | --- |"]

        def row(method: str, output: str, size: float, seconds: float, r: dict) -> str:
            return (f"| {method} | {output} | {size / 1e3:.1f} KB | {seconds:.0f} | {pct(r['instance'])} | "
                    f"{pct(r['edits'])} | {pct(r['drift'])} |")

        rows.append(row("LoRA (the demo)", LORA_FILE, self.lora.stat().st_size, self.demo_seconds, self.demo))
        self.tag = "full"
        folder = self.train("full fine-tuning", REPO / "data" / "raj", method="full").parent / "model"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        model = self.model(path=folder)
        rows.append(row("full fine-tuning", "model/ (a whole diffusers folder)", size, self.seconds,
                        self.subject_rows(model) | self.drift(model)))
        for where, settings, move in (("1 vector before the noun, train.py's default", {}, str),
                                      ("3 vectors after the noun", AFTER_THE_NOUN, after_the_noun)):
            self.tag = "textual-inversion" + ("-after-the-noun" if settings else "")
            validation = [move(p) for p in load_subject(REPO / "data" / "raj").validation_prompts]
            embedding = self.train(f"textual inversion, {where}", REPO / "data" / "raj", method="textual-inversion",
                                   validation_prompts=validation, **settings).parent / "learned_embeds.safetensors"
            model = self.model()
            word, vectors = load_embedding(model.text, embedding)
            name = lambda prompt: name_the_word(move(prompt), "rraj", word, vectors)  # noqa: E731
            result = self.subject_rows(model, name) | self.drift(model)
            rows.append(row(f"textual inversion ({where}: \"{name(INSTANCE)}\")", "learned_embeds.safetensors",
                            embedding.stat().st_size, self.seconds, result))
        self.textual_inversion = result  # the last, the word after the noun, is the one the targets table shows
        return "\n".join(rows)

    def targets(self) -> str:
        """The bundled model's targets next to what the sections measured (64+ samples per prompt)."""
        agree, demo, ti = self.base_agreement, self.demo, self.textual_inversion
        at_least = lambda what, share, bound: (what, pct(share), f">= {pct(bound)}", share >= bound)  # noqa: E731
        rows = [
            at_least("base model: images with every named field right", agree["images"], 0.6),
            at_least("base model: named fields right", agree["fields"], 0.85),
            at_least("demo run: the subject's look", demo["instance"], 0.7),
            at_least(f"demo run: subject kept under the {len(EDITS)} edits (mean)", demo["edits"], 0.35),
            ("demo run: drift", pct(demo["drift"]), "<= 5%", demo["drift"] <= 0.05),
            (f"demo run: \"{CLASS}\" diversity (base model {self.base_div:.2f})", f"{demo['div']:.2f}",
             "within 0.10 of the base model's", abs(demo["div"] - self.base_div) <= 0.1),
            ("demo run: training time (1 thread)", f"{self.demo_seconds:.0f} s", "<= 180 s", self.demo_seconds <= 180),
            at_least("textual inversion (3 vectors after the noun): the subject's look", ti["instance"], 0.2),
        ]
        return "\n".join(["| measure | measured | target | reached |", "| --- | --- | --- | --- |",
                          *(f"| {what} | {got} | {want} | {'yes' if ok else 'no'} |" for what, got, want, ok in rows)])


def pretraining_compute(model_path: Path) -> str:
    """One paragraph from the model folder's pretraining.json: every run that trained the bundled weights."""
    path = Path(model_path) / RECORD
    if not path.is_file():
        return f"{model_path} has no {RECORD}: its pretraining compute is not recorded."
    record = json.loads(path.read_text())
    total = record["total"]
    runs = "; ".join(f"{r['unet_steps']:,} UNet steps at batch {r['unet_batch']}, lr {r['unet_lr']:g}, seed {r['seed']}"
                     + (f", {r['vae_steps']:,} VAE steps" if r["vae_steps"] else "") + f", {r['seconds'] / 60:.0f} min on "
                     f"{r['threads']} thread(s)" for r in record["runs"])
    return (f"Bundled model: {total['unet_steps']:,} UNet steps ({total['unet_samples']:,} training pictures) in "
            f"{len(record['runs'])} run(s) of `python -m minidream.toy.pretrain` (later runs with --start-from), "
            f"{total['seconds'] / 60:.0f} min of CPU in all: {runs}.")


LOG_MARKER = "<!-- what was tried: the text below is kept when this file is regenerated -->"


def section_key(title: str) -> str:
    """'### 2-3. The demo run, ...' -> '2-3'; '8. Context leak: ...' -> '8'; '### Targets' -> 'Targets'."""
    return title.removeprefix("### ").split()[0].rstrip(".")


def results_text(head: str, sections: dict[str, str], old: str = "", only: bool = False) -> str:
    """The results file: head, sections (key -> text, from its '### ' heading on) in their numbered order
    (Targets first), then the log kept from the old file's text (LOG_MARKER on). With `only` (--only),
    the old file's head and sections stay, and `sections` replace those with the same key."""
    log = old[old.index(LOG_MARKER):] if LOG_MARKER in old else ""
    old_head, *old_parts = re.split(r"^(?=### )", old[:len(old) - len(log)], flags=re.M)
    if only and old_head.strip():
        head, sections = old_head, {section_key(p): p.rstrip("\n") + "\n" for p in old_parts} | sections
    order = sorted(sections, key=lambda k: int(k.split("-")[0]) if k[0].isdigit() else 0)
    return head + "\n".join(sections[k] for k in order) + (f"\n{log}" if log else "")


FIGURES = {  # sample grid -> its row label in the overview picture the README shows
    "base-a-photo-of-person": "base model: a photo of person",
    "prior-a-photo-of-rraj-person": "after training: a photo of rraj person",
    "prior-a-photo-of-rraj-person-on-the-beach": "... on the beach",
    "prior-a-photo-of-rraj-person-in-the-snow": "... in the snow",
    "prior-a-painting-of-rraj-person": "a painting of rraj person",
    "prior-a-photo-of-person": "a photo of person (trained with prior preservation)",
    "no-prior-a-photo-of-person": "a photo of person (trained without it)",
}
FIGURES_DIR = REPO / "docs" / "toy-world"  # the README shows overview.png; docs/toy-world.md the rows


def first_samples(grid: Image.Image, n: int = 8, side: int = 64, pad: int = 2) -> list[Image.Image]:
    """The first n pictures of a sample grid (tw.grid's layout: `pad` px of white around square tiles)."""
    return [grid.crop((pad + i * (side + pad), pad, pad + i * (side + pad) + side, pad + side)) for i in range(n)]


def readme_figures(grids: Path, dest: Path = FIGURES_DIR) -> None:
    """The first 8 samples of some grids: one labelled overview picture, one row per grid enlarged 2x (nearest)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = {name: first_samples(Image.open(grids / f"{name}.png").convert("RGB")) for name in FIGURES}
    for name, samples in rows.items():
        row = tw.grid(samples, cols=len(samples))
        row.resize((2 * row.width, 2 * row.height), Image.NEAREST).save(dest / f"{name}.png", optimize=True)
    labelled_grid([im for row in rows.values() for im in row], list(FIGURES.values())).save(dest / "overview.png", optimize=True)


def command(s: Settings) -> str:
    """The command line that reproduces a run with settings `s`."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(s).items() if v != getattr(Settings(), k)]
    return " ".join(["python -m minidream.toy.toy_experiments", *flags])


def run(s: Settings) -> Path:
    torch.set_num_threads(s.threads)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    e = Experiments(s)
    (e.out / "grids").mkdir(parents=True, exist_ok=True)
    sections = [("1. The pretrained base model", e.base), ("2-3. The demo run, with and without prior preservation",
                e.demo_and_prior), ("4. How many instance images", e.instance_images),
                ("5. Sampler and steps (the demo LoRA)", e.samplers), ("6. Merging with a style LoRA", e.merging),
                ("7. LoRA, full fine-tuning or textual inversion", e.methods),
                ("8. Context leak: one shared background, captions and masks",
                 lambda: context_leak(e, TrainConfig.unmasked_weight)),
                ("9. A quantised frozen base (--base-weights int8 / nf4)", lambda: quantised_base(e)),
                ("10. Fewer sampler steps for class images and validation (DPM-Solver++)", lambda: fewer_steps(e)),
                ("11. DoRA, pivotal tuning, EMA: the methods people train with now", lambda: methods_now(e, s.variants))]
    wanted = set(s.only.replace(" ", "").split(","))  # '2' or '3' names '2-3'
    todo = [(t, f) for t, f in sections if not s.only or {section_key(t), *section_key(t).split("-")} & wanted]
    keys = {section_key(t) for t, _ in todo}
    if not todo or (keys - {"1", "8", "9", "10", "11"} and not {"1", "2-3"} <= keys):  # 2-7 use 1's and 2-3's
        raise SystemExit(f"--only {s.only}: the sections are 1, 2-3, 4, ..., 11; 2-7 need 1 and 2 (--only 1,2,5)")
    path = Path(s.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    old, parts = path.read_text() if path.is_file() else "", {}
    for title, section in todo:  # the file is rewritten after every section: a crash keeps what was measured
        t, notes = time.perf_counter(), len(e.notes)
        table = section()
        made_by = f"; `{command(s)}`" if s.only else ""  # a section measured on its own says how
        parts[section_key(title)] = (f"### {title}\n\n{table}\n\n({time.perf_counter() - t:.0f} s{made_by})\n"
                                     + "".join(f"- {n}\n" for n in e.notes[notes:]))
        print(parts[section_key(title)], flush=True)
        done = "" if len(parts) == len(sections) else f" (sections done so far: {len(parts)} of {len(sections)})"
        if not done:
            parts["Targets"] = f"### Targets\n\n{e.targets()}\n"
        head = (f"## DreamBooth in the toy world (measured on CPU)\n\n`{command(s)}`: "
                f"{(time.perf_counter() - start) / 60:.1f} min{done}; sampling on {s.threads} thread(s), training on "
                f"the demo recipe's {PRESETS['tiny', 'lora']['cpu_threads']}; load average {load0:.1f} -> "
                f"{os.getloadavg()[0]:.1f}. {s.samples} samples per prompt (seeds {s.seed}...), DDIM 20 steps and "
                f"guidance 5 unless said; shares are of samples in which the toy judge (weights/toy-judge.safetensors) "
                f"sees the named fields. Sample grids: {s.out}/grids/.\n\n{pretraining_compute(e.model_path)}\n\n")
        path.write_text(results_text(head, parts, old, bool(s.only)))
    if not s.only:  # the figures show sections 1 and 2-3
        readme_figures(e.out / "grids")
    print(f"wrote {path}" + ("" if s.only else f" and {FIGURES_DIR}"))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidream.toy.toy_experiments", description=__doc__.split("\n\n")[0])
    for f in fields(Settings):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.default is not None else int, default=f.default,
                        help=f"{f.metadata['help']} [%(default)s]")
    run(Settings(**vars(ap.parse_args(argv))))


if __name__ == "__main__":
    main()
