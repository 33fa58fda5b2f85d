"""minidream.eval.evaluate: the DreamBooth prompt set, and the evaluation + the 8-row experiment end to end on a
tiny SDXL with tiny CLIP / DINO models (CPU, tiny settings: 2 prompts x 2 images, 2-3 sampler steps)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _eval_fixtures import TINY_SDXL, write_lora, write_subject, write_tiny_clip, write_tiny_dino
from minidream import pipeline
from minidream.config import LORA_FILE
from minidream.samplers import ddim
from minidream.eval import evaluate, metrics
from minidream.eval.eval_prompts import LIVE_PROMPTS, OBJECT_PROMPTS, custom_prompts, dreambooth_prompts, subject_kind
from minidream.eval.eval_targets import EvalError
from minidream.formats.models import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = TINY_SDXL
    yield dict(root=root, model=model, clip=write_tiny_clip(root / "clip"), dino=write_tiny_dino(root / "dino"),
                prior=write_lora(root / "prior.safetensors", model, seed=1),
                no_prior=write_lora(root / "no_prior.safetensors", model, seed=2),
                subject=write_subject(root / "rraj"))


def tiny_args(setup, out):
    return ["--limit", "2", "--images-per-prompt", "2", "--class-images", "2", "--clip", str(setup["clip"]),
            "--dino", str(setup["dino"]), "--model", str(setup["model"]), "--device", "cpu", "--out", str(out)]


def table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| scheduler")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


# ----------------------------------------------------------------------------- prompts

def test_dreambooth_prompt_sets():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    assert len(set(OBJECT_PROMPTS)) == len(set(LIVE_PROMPTS)) == 25
    dog = dreambooth_prompts("rraj", "dog")
    assert dog[0] == "a rraj dog in the jungle" and "a rraj dog wearing a santa hat" in dog
    assert dog[-1] == "a cube shaped rraj dog"
    pack = dreambooth_prompts("sks", "backpack")
    assert "a sks backpack floating in an ocean of milk" in pack and not any("hat" in p for p in pack)
    assert [subject_kind(c) for c in ("dog", "cat", "person", "stuffed animal", "toy", "backpack")] == \
           ["live", "live", "live", "object", "object", "object"]
    assert dreambooth_prompts("rraj", "dog", kind="object") == [t.format("rraj dog") for t in OBJECT_PROMPTS]


def test_custom_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a {} on the moon\n\n  a photo of rraj dog  \n")
    assert custom_prompts([str(f), "a red {}"], "rraj", "dog") == \
           ["a rraj dog on the moon", "a photo of rraj dog", "a red rraj dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        custom_prompts([str(empty)], "rraj", "dog")


# ----------------------------------------------------------------------------- sampling

def test_seeds_are_per_image_whatever_the_batch(setup, tmp_path):
    """Image j of a prompt is the image generate(seed=seed + j) gives alone, in batches of 1 or 2."""
    model = load_model(setup["model"])
    meta = {"sampler": "ddim", "steps": "2", "guidance_scale": "5.0", "size": str(model.default_size)}
    seeds = [3, 4, 5]
    one = evaluate.samples(model, "a rraj dog", [tmp_path / f"a{s}.png" for s in seeds], seeds, meta, 1)
    two = evaluate.samples(model, "a rraj dog", [tmp_path / f"b{s}.png" for s in seeds], seeds, meta, 2)
    alone = pipeline.generate(model, "a rraj dog", sampler=ddim, steps=2, seed=4, progress=False)[0]
    for a, b in zip(one, two):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert np.abs(np.asarray(one[1], dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert np.asarray(one[0]).tolist() != np.asarray(one[1]).tolist()  # different seeds, different images
    assert Image.open(tmp_path / "a4.png").text["seed"] == "4"


# ----------------------------------------------------------------------------- end to end

def test_experiment_writes_the_eight_row_table(setup, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    argv = ["--prior", str(setup["prior"]), "--no-prior", str(setup["no_prior"]), "--subject", str(setup["subject"]),
            "--steps", "2", "3", *tiny_args(setup, out)]
    rows = evaluate.main(argv)

    md = (out / "metrics.md").read_text()
    cells = table_rows(md)
    assert [(c[0], c[1], c[2]) for c in cells] == [(s, n, p) for p in ("on", "off") for s in ("DDIM", "PNDM")
                                                  for n in ("2", "3")]
    assert all(-1 <= float(v) <= 1 for c in cells for v in c[3:])
    assert "DIV (1-DINO)" in md and "NOT the paper's LPIPS" in md and "0.668" in md
    for r in rows:
        sc = r.scores
        assert all(math.isfinite(v) for v in (sc.clip_i, sc.clip_t, sc.dino, sc.pres, sc.div))
        for name in ("grid.png", "class_grid.png", "metrics.json", "images/p01-s1.png", "class/s1.png"):
            assert (r.folder / name).is_file(), name
    assert len(json.loads((out / "metrics.json").read_text())) == 8

    # The two LoRAs are really applied: same prompt, seed and sampler, different images.
    a, b = (np.asarray(Image.open(out / lbl / "ddim-2" / "images" / "p00-s0.png")) for lbl in ("prior", "no-prior"))
    assert not np.array_equal(a, b)

    # The table is metrics.score of the images written: rescore one folder from its PNGs.
    r = rows[5]  # no-prior, DDIM, 3 steps
    clip, dino = metrics.load_clip(str(setup["clip"])), metrics.load_dino(str(setup["dino"]))
    prompts = json.loads((r.folder / "metrics.json").read_text())["prompts"]
    gen = {p: [Image.open(r.folder / "images" / f"p{i:02d}-s{s}.png").convert("RGB") for s in (0, 1)]
           for i, p in enumerate(prompts)}
    cls = [Image.open(r.folder / "class" / f"s{s}.png").convert("RGB") for s in (0, 1)]
    real = [Image.open(p).convert("RGB") for p in sorted(setup["subject"].glob("*.png"))]
    again = metrics.score(real, gen, cls, "rraj", clip, dino)
    assert again.as_dict() == pytest.approx(r.scores.as_dict())

    # Run again: every sample is reused from disk (no sampling), same numbers.
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: pytest.fail("sampled again"))
    assert [x.scores.as_dict() for x in evaluate.main(argv)] == [x.scores.as_dict() for x in rows]


def test_run_folder(setup, tmp_path):
    """A training run folder: subject, prior and guidance come from its config.json."""
    run = tmp_path / "rraj-20250101-000000"
    run.mkdir()
    (run / LORA_FILE).write_bytes(setup["prior"].read_bytes())
    (run / "config.json").write_text(json.dumps({"subject": str(setup["subject"]), "prior": True,
                                                 "model": str(setup["model"]), "guidance_scale": 3.0}))
    args = tiny_args(setup, tmp_path / "unused")
    rows = evaluate.main([str(run), "--steps", "2", *args[:-2]])  # default --out: <run>/eval
    assert [(r.sampler, r.steps, r.prior) for r in rows] == [("ddim", 2, True)]
    cells = table_rows((run / "eval" / "metrics.md").read_text())
    assert [c[:3] for c in cells] == [["DDIM", "2", "on"]]
    saved = json.loads((run / "eval" / "ddim-2" / "metrics.json").read_text())
    assert saved["guidance_scale"] == 3.0 and saved["prompts"][0] == "a rraj dog in the jungle"
    with pytest.raises(ValueError, match="swap the two runs"):  # a prior run passed as --no-prior
        evaluate.main(["--prior", str(setup["prior"]), "--no-prior", str(run), "--subject", str(setup["subject"]),
                       *args])


def test_missing_metric_model_fails_before_sampling(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: pytest.fail("sampled before checking the models"))
    argv = ["--lora", str(setup["prior"]), "--subject", str(setup["subject"]), *tiny_args(setup, tmp_path)]
    argv[argv.index("--dino") + 1] = str(tmp_path / "no-dino-here")
    with pytest.raises(metrics.MetricModelError, match="hf download facebook/dino-vits16"):
        evaluate.main(argv)


def test_the_command_without_metric_weights_says_so_in_one_line(setup, tmp_path):
    argv = ["--lora", str(setup["prior"]), "--subject", str(setup["subject"]), *tiny_args(setup, tmp_path)]
    argv[argv.index("--dino") + 1] = str(tmp_path / "no-dino-here")
    done = subprocess.run([sys.executable, "-m", "minidream.eval.evaluate", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]  # after transformers' progress bar of the CLIP that did load
    assert done.stderr.count("error:") == 1 and line.startswith("python -m minidream.eval.evaluate: error: ") and "hf download facebook/dino-vits16" in line


def test_bad_input_is_named(setup, tmp_path):
    with pytest.raises(EvalError, match="--no-prior"):
        evaluate.main(["--prior", str(setup["prior"]), *tiny_args(setup, tmp_path)])
    with pytest.raises(ValueError, match="--subject"):
        evaluate.main(["--lora", str(setup["prior"]), *tiny_args(setup, tmp_path)])
    with pytest.raises(EvalError, match="config.json"):
        evaluate.main([str(tmp_path), *tiny_args(setup, tmp_path)])


def test_train_pair_then_experiment(setup, tmp_path):
    """The experiment from scratch: train with and without prior preservation, then the 8-row table."""
    tiny = dict(steps=2, num_class_images=2, class_steps=2, validate_every=0, save_every=0, device="cpu",
                resolution=64)
    with pytest.warns(UserWarning, match="smaller than the training resolution 64"):  # the 40 x 48 test photos
        prior_run, no_prior_run = evaluate.train_pair(str(setup["subject"]), str(tmp_path / "runs"),
                                                      str(setup["model"]), **tiny)
    assert json.loads((prior_run / "config.json").read_text())["prior"] is True
    assert json.loads((no_prior_run / "config.json").read_text())["prior"] is False
    rows = evaluate.main(["--prior", str(prior_run), "--no-prior", str(no_prior_run), "--steps", "2", "3",
                          *tiny_args(setup, tmp_path / "exp")])
    assert [(r.prior, r.sampler, r.steps) for r in rows] == [(p, s, n) for p in (True, False)
                                                             for s in ("ddim", "pndm") for n in (2, 3)]
