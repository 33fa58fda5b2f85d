"""The toy world's judge: the committed weights reach their stated accuracy on held-out images
(clean and blurred), see the bundled subject, and the API behaves as documented."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidream.toy import toyworld as tw
from minidream.toy.judge import (HEADS, IGNORE, Judge, JudgeConfig, evaluate, gaussian_blur, labels,
                             train)
from minidream.toy.toy_eval import subject_marks
from minidream.toy.toydraw import render

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights" / "toy-judge.safetensors"

# Measured by `python -m minidream.toy.judge eval --n 2000` (held-out seed 12345) on the committed
# weights: kind, style, context, color, hat_color 1.000; skin 0.994, hair 0.994, eyes 0.932,
# hat 0.998, glasses 0.989, glasses_color 0.990, all_subject 0.983. These tests use 300 other
# held-out images, so the thresholds sit a few points below for that sample's noise.
MIN_ACC = {"kind": 0.98, "style": 0.98, "context": 0.98, "color": 0.98, "skin": 0.97,
           "hair": 0.97, "eyes": 0.85, "hat": 0.97, "hat_color": 0.97, "glasses": 0.96,
           "glasses_color": 0.95, "all_subject": 0.93}


@pytest.fixture(scope="module")
def judge():
    return Judge.load(WEIGHTS)


def test_judge_accuracy_on_held_out_images(judge):
    acc = evaluate(judge, n=300, seed=777)
    low = {h: round(acc[h], 3) for h in MIN_ACC if acc[h] < MIN_ACC[h]}
    assert not low, f"heads below their stated accuracy: {low}"


def test_judge_is_robust_to_blur_and_noise(judge):
    acc = evaluate(judge, n=300, seed=778, blur=1.0, noise=0.03)
    low = {h: round(acc[h], 3) for h in MIN_ACC if acc[h] < MIN_ACC[h] - 0.03}
    assert not low, f"heads that fail on blurred images: {low}"


def test_judge_sees_the_bundled_subject(judge):
    images = [Image.open(p) for p in sorted((ROOT / "data" / "raj").glob("*.png"))]
    look = tw.SUBJECT_LOOK
    assert judge.score(images, look) == 1.0
    # ...and not in a person with another skin colour, or in dogs.
    others = [render(tw.Attributes(**{**a.__dict__, "skin": "tan"})) for a in tw.subject_attributes()]
    assert judge.score(others, look) == 0.0
    dogs = [render(tw.sample_attributes(np.random.default_rng(i), kind="dog")) for i in range(6)]
    assert judge.score(dogs, "a photo of person") == 0.0
    # Mark by mark: the tan-skinned copies miss only the skin.
    assert subject_marks(judge, others) == {"skin": 0.0, "hat": 1.0, "hat_color": 1.0, "glasses": 1.0,
                                            "glasses_color": 1.0}
    assert set(subject_marks(judge, images).values()) == {1.0}


def test_predict_formats_and_none_fields(judge):
    rng = np.random.default_rng(5)
    attrs = [tw.sample_attributes(rng, kind=k, style="photo") for k in ("dog", "person")]
    images = [render(a) for a in attrs]
    as_pil = judge.predict(images)
    as_array = judge.predict(np.stack([np.asarray(im) for im in images]))
    as_tensor = judge.predict(torch.from_numpy(np.stack([np.asarray(im) for im in images]))
                              .permute(0, 3, 1, 2).float() / 255)
    big = judge.predict([im.resize((128, 128), Image.NEAREST) for im in images])
    for preds in (as_array, as_tensor, big):
        assert [p["kind"] for p in preds] == [p["kind"] for p in as_pil]
    dog, person = as_pil
    assert dog["kind"] == "dog" and all(dog[h] is None for h in ("skin", "hat", "glasses"))
    assert person["kind"] == "person" and person["skin"] == attrs[1].skin
    for h, p in person["probs"].items():
        assert set(p) == set(HEADS[h]) and abs(sum(p.values()) - 1) < 1e-5
    with pytest.raises(ValueError, match="no head"):
        judge.check(images, {"shoe": "red"})
    checks = judge.check(images, f"a photo of person with {attrs[1].skin} skin")
    assert checks[1] == {"style": True, "kind": True, "skin": True} and not checks[0]["kind"]


def test_labels_mask_fields_that_do_not_apply():
    dog = tw.Attributes("dog", "photo", "beach", "brown")
    y = labels([dog])[0].tolist()
    for h, v in zip(HEADS, y):
        assert (v == IGNORE) == (h not in ("kind", "style", "context", "color")), h


def test_gaussian_blur_keeps_flat_images_and_softens_edges():
    flat = torch.full((2, 3, 16, 16), 0.3)
    out = gaussian_blur(flat, torch.tensor([0.5, 1.5]))
    assert torch.allclose(out, flat, atol=1e-6)
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1
    soft = gaussian_blur(edge, torch.tensor([1.0]))
    assert 0.05 < soft[0, 0, 0, 7] < 0.5 < soft[0, 0, 0, 8] < 0.95


def test_training_is_deterministic_from_the_seed(tmp_path):
    small = JudgeConfig(width=4, hidden=8)
    a = train(steps=2, batch_size=8, seed=3, config=small, log_every=10)
    b = train(steps=2, batch_size=8, seed=3, config=small, log_every=10)
    c = train(steps=2, batch_size=8, seed=4, config=small, log_every=10)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(),
                               c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(),
                                                         c.state_dict().values()))
    a.save(tmp_path / "j.safetensors")
    back = Judge.load(tmp_path / "j.safetensors")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in a.state_dict().items())
