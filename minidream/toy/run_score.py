"""The run scores itself: after `python train.py` on a toy-world subject, the toy judge looks at samples of
the finished result and train.py prints one line, e.g. `subject look 72% | drift 3% | edit kept 41%`.

    subject look   samples of the instance prompt ("a photo of rraj person") that show the subject's look
                   (skin, hat, hat colour, glasses, glasses colour): subject fidelity
    drift          samples of the class prompt ("a photo of person") that show the subject's look: language
                   drift, the idea behind DreamBooth's PRES metric (Ruiz et al. 2022, sec. 4.3); lower is better
    edit kept      samples of "<instance prompt> on the beach" that show the subject's look on the beach:
                   recontextualisation (sec. 4.4)

The samples use fixed seeds, so a result always gets the same score. The line and the numbers are stored in
the run folder (score.json). Runs the judge cannot score are skipped with a note: subjects without a look in
their subject.json ("attributes", as data/raj has), and models that do not draw the toy world's 64 px images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minidream.config import EMBEDDING_FILE, LORA_FILE
from minidream.data import SETTINGS_FILE, load_subject
from minidream.files import write_json
from minidream.formats.lora_files import add_loras
from minidream.methods.textual_inversion import load_embedding, name_the_word
from minidream.formats import load_model, model_image_size
from minidream.formats.models import REPO
from minidream.toy import toy_eval as te
from minidream.toy import toyworld as tw
from minidream.toy.judge import DEFAULT_PATH, Judge
from minidream.toy.toydraw import SIZE

SCORE_FILE = "score.json"
SAMPLES = 32  # images per prompt
SEED = 1000  # seed of the first sample batch (the evaluation's, benchmarks/TOY_WORLD.md)
EDIT = " on the beach"  # appended to the instance prompt: a place the subject photos never show
JUDGE_FILE = REPO / DEFAULT_PATH


def subject_look(subject_folder: Path) -> dict[str, str] | None:
    """The subject's look as subject.json's "attributes" give it (only the fields that make the subject, not its
    hair or eyes, which prompts may change), or None when the folder does not describe one."""
    path = Path(subject_folder) / SETTINGS_FILE
    try:
        attributes = json.loads(path.read_text()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(attributes, dict):
        return None
    look = {k: attributes.get(k) for k in tw.SUBJECT_LOOK}
    return look if all(isinstance(v, str) for v in look.values()) else None


def why_not_scored(cfg: dict, judge_file: Path) -> str | None:
    """None when the judge can score this run; else the reason it cannot, for the note."""
    if not Path(judge_file).is_file():
        return f"no toy judge at {judge_file}"
    if subject_look(cfg["subject"]) is None:
        return f"the toy judge knows only toy-world subjects ({SETTINGS_FILE} with \"attributes\", as data/raj has)"
    if model_image_size(cfg["model"]) != SIZE:
        return f"the toy judge knows only toy-world models ({SIZE} px images)"
    return None


def trained_model(run: Path, cfg: dict, token: str):
    """The run's result, ready to sample, and how its prompts name the subject: a function from a prompt with
    the subject's token to the prompt to sample (textual inversion's word replaces the token)."""
    if cfg["method"] == "full":
        return load_model(run / "model"), str
    model = load_model(cfg["model"])
    if cfg["method"] != "textual-inversion":
        add_loras(model, [(run / LORA_FILE, 1.0)])
    if cfg["method"] in ("textual-inversion", "pivotal"):  # a new word names the subject
        word, vectors = load_embedding(model.text, run / EMBEDDING_FILE)
        return model, lambda prompt: name_the_word(prompt, token, word, vectors)
    return model, str


def score(model, judge: Judge, look: dict[str, str], instance_prompt: str, class_prompt: str,
          samples: int = SAMPLES, name_the_subject=str) -> dict:
    """The three shares for one model (see the module docstring). The prompts use the subject's token, which
    the judge's caption grammar reads; `name_the_subject` turns each into the prompt the model is given."""
    prompts = {"subject look": instance_prompt, "drift": class_prompt, "edit kept": instance_prompt + EDIT}
    wanted = {"subject look": look, "drift": look, "edit kept": te.named_fields(prompts["edit kept"]) | look}
    sampled = {name: name_the_subject(prompt) for name, prompt in prompts.items()}
    shares = {}
    for name, prompt in sampled.items():
        with torch.no_grad():
            images = te.sample_images(model, [prompt] * samples, seed=SEED)
        shares[name] = judge.score(images, wanted[name])
    line = " | ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())
    return {"line": line, "shares": shares, "samples_per_prompt": samples, "seed": SEED, "prompts": sampled}


def score_run(run: Path, samples: int = SAMPLES, judge_file: Path = JUDGE_FILE) -> dict | None:
    """Score a finished run, print the line and write <run>/score.json; None (and a note) when the judge
    cannot score it."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    reason = why_not_scored(cfg, judge_file)
    if reason:
        print(f"note: the result is not scored: {reason}")
        return None
    print(f"scoring the result with the toy judge ({samples} samples each of 3 prompts) ...", flush=True)
    subject = load_subject(cfg["subject"], cfg["token"], cfg["class_noun"], cfg["instance_prompt"],
                           cfg["class_prompt"])
    try:
        te.named_fields(subject.instance_prompt + EDIT)
    except ValueError:  # a prompt the toy world's captions cannot say
        print(f"note: the result is not scored: the toy judge cannot read the prompt {subject.instance_prompt!r}")
        return None
    model, name_the_subject = trained_model(run, cfg, subject.token)
    result = score(model, Judge.load(judge_file), subject_look(subject.folder), subject.instance_prompt,
                   subject.class_prompt, samples, name_the_subject)
    write_json(run / SCORE_FILE, result)
    print(f"{result['line']}  (toy judge; {run / SCORE_FILE})")
    return result
