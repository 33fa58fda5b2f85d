"""The run's own score (minidream/toy/run_score.py): computed from the judge's view of real samples.

A fresh train.py run printing the line is checked in test_user_path.py (two steps: 0% everywhere).
Here: the base model, which has never seen the subject, scores 0%; pictures that do show the subject
score 100%; runs the judge cannot score are skipped with a note and leave no score file.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minidream.config import EMBEDDING_FILE
from minidream.formats.models import BUNDLED_MODEL, load_model
from minidream.toy import run_score
from minidream.toy import toyworld as tw
from minidream.toy.judge import Judge
from minidream.toy.toydraw import render

ROOT = Path(__file__).resolve().parent.parent
LOOK = run_score.subject_look(ROOT / "data" / "raj")


@pytest.fixture(scope="module")
def judge():
    return Judge.load(run_score.JUDGE_FILE)


def test_data_raj_describes_the_subjects_look():
    assert LOOK == tw.SUBJECT_LOOK


def test_the_base_model_cannot_draw_the_subject(judge):
    model = load_model(ROOT / BUNDLED_MODEL)
    result = run_score.score(model, judge, LOOK, "a photo of rraj person", "a photo of person", samples=8)
    assert result["shares"]["subject look"] == 0.0 and result["shares"]["edit kept"] == 0.0
    assert result["line"].startswith("subject look 0% | drift ")


def test_pictures_of_the_subject_score_full_marks(judge, monkeypatch):
    """A stand-in sampler that draws the subject (on the beach when the prompt says so) gets 100%, drift included:
    the line follows what the judge sees."""
    shot = tw.subject_attributes()[0]

    def draw_the_subject(model, prompts, seed=0, **kw):
        context = "beach" if "beach" in prompts[0] else "plain"
        return [render(dataclasses.replace(shot, context=context, seed=seed + i)) for i in range(len(prompts))]

    monkeypatch.setattr(run_score.te, "sample_images", draw_the_subject)
    result = run_score.score(None, judge, LOOK, "a photo of rraj person", "a photo of person", samples=8)
    assert result["line"] == "subject look 100% | drift 100% | edit kept 100%"


def write_run(tmp_path: Path, subject: Path, model: Path, **settings) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = {"subject": str(subject), "model": str(model), "method": "lora", "token": None, "class_noun": None,
              "instance_prompt": None, "class_prompt": None} | settings
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_a_subject_without_a_look_is_not_scored(tmp_path, capsys):
    subject = tmp_path / "dog"
    subject.mkdir()
    (subject / "subject.json").write_text(json.dumps({"token": "sks", "class_noun": "dog"}))
    run = write_run(tmp_path, subject, ROOT / BUNDLED_MODEL)
    assert run_score.score_run(run) is None
    assert "not scored: the toy judge knows only toy-world subjects" in capsys.readouterr().out
    assert not (run / run_score.SCORE_FILE).exists()


def test_a_model_of_another_size_is_not_scored(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(ROOT / BUNDLED_MODEL, model)
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(unet_config | {"sample_size": 2 * unet_config["sample_size"]}))
    run = write_run(tmp_path, ROOT / "data" / "raj", model)
    assert run_score.score_run(run) is None
    assert "the toy judge knows only toy-world models (64 px images)" in capsys.readouterr().out


@pytest.mark.parametrize("instance_prompt, sampled", [
    (None, "a photo of <rraj> <rraj>_1 <rraj>_2 person"),
    ("a photo of person rraj", "a photo of person <rraj> <rraj>_1 <rraj>_2")])
def test_a_textual_inversion_run_is_scored_with_every_vector_of_its_word(tmp_path, instance_prompt, sampled):
    """The judge reads the prompts with the subject's token; the model is given the learned word, all 3 vectors."""
    model = load_model(ROOT / BUNDLED_MODEL)
    widths = {key: enc.get_input_embeddings().weight.shape[1] for key, enc in
              (("clip_l", model.text.text_encoder), ("clip_g", model.text.text_encoder_2))}
    run = write_run(tmp_path, ROOT / "data" / "raj", ROOT / BUNDLED_MODEL, method="textual-inversion",
                    instance_prompt=instance_prompt)
    save_file({key: torch.randn(3, width) for key, width in widths.items()}, str(run / EMBEDDING_FILE),
              metadata={"token": "<rraj>"})
    result = run_score.score_run(run, samples=2)
    assert result["prompts"] == {"subject look": sampled, "drift": "a photo of person",
                                 "edit kept": sampled + " on the beach"}
    assert json.loads((run / run_score.SCORE_FILE).read_text())["line"] == result["line"]
