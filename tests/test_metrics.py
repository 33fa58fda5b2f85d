"""minidream.eval.metrics: the cosine math against hand computations, the embedders against transformers' own
forward passes, identical images, and the errors for missing models. Tiny random CLIP / DINO
models written to tmp in their hub layout (tests/_eval_fixtures.py); nothing is downloaded."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, ViTModel

from _eval_fixtures import SIZE, random_image, write_tiny_clip, write_tiny_dino
from minidream.eval import metrics


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    clip_dir, dino_dir = write_tiny_clip(root / "clip"), write_tiny_dino(root / "dino")
    yield clip_dir, dino_dir, metrics.load_clip(str(clip_dir)), metrics.load_dino(str(dino_dir))


# ----------------------------------------------------------------------------- math by hand

def test_pairwise_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])
    # a0 vs b: 1/sqrt2, 1, -1; a1 vs b: 1/sqrt2, 0, 0 (lengths do not matter)
    expected = (2 / math.sqrt(2) + 1 - 1) / 6
    assert metrics.mean_pairwise_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert metrics.cosine_matrix(a, b)[0].tolist() == pytest.approx([1 / math.sqrt(2), 1, -1])


def test_cosine_within_skips_self_pairs():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    # pairs (0,1) = 1/sqrt2, (0,2) = 0, (1,2) = 1/sqrt2; each counted both ways
    assert metrics.mean_cosine_within(a) == pytest.approx(2 / math.sqrt(2) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_cosine_within(a[:1])


def test_matched_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert metrics.mean_matched_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="as many rows"):
        metrics.mean_matched_cosine(a, b[:1])


def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_each_metric_equals_a_loop_over_fixed_embeddings():
    g = torch.Generator().manual_seed(0)
    gen, real, cls = (torch.randn(n, 8, generator=g) for n in (6, 3, 4))
    texts = torch.randn(6, 8, generator=g)
    G, R, C, T = (x.numpy().astype(np.float64) for x in (gen, real, cls, texts))
    all_pairs = np.mean([_cos(x, y) for x in G for y in R])
    assert metrics.clip_i(gen, real) == pytest.approx(all_pairs, abs=1e-12)
    assert metrics.dino_score(gen, real) == pytest.approx(all_pairs, abs=1e-12)
    assert metrics.pres(cls, real) == pytest.approx(np.mean([_cos(x, y) for x in C for y in R]), abs=1e-12)
    assert metrics.clip_t(gen, texts) == pytest.approx(np.mean([_cos(x, y) for x, y in zip(G, T)]), abs=1e-12)
    # DIV: two prompts with 3 samples each; 1 - mean cosine over the distinct pairs of each, averaged
    per_prompt = [1 - np.mean([_cos(grp[i], grp[j]) for i in range(3) for j in range(3) if i != j])
                  for grp in (G[:3], G[3:])]
    assert metrics.div_from_embeddings([gen[:3], gen[3:]]) == pytest.approx(np.mean(per_prompt), abs=1e-12)


def test_prompt_without_token():
    assert metrics.prompt_without_token("a rraj dog on the beach", "rraj") == "a dog on the beach"
    assert metrics.prompt_without_token("a red rraj dog", "rraj") == "a red dog"
    assert metrics.prompt_without_token("a rrajx dog", "rraj") == "a rrajx dog"  # whole words only
    assert metrics.prompt_without_token("a dog", "") == "a dog"


# ----------------------------------------------------------------------------- the models

def test_identical_images_score_one(models):
    *_, clip, dino = models
    img = random_image(0)
    s = metrics.score([img, img], {"a rraj dog": [img, img, img]}, [img], "rraj", clip, dino)
    for value in (s.clip_i, s.dino, s.pres, s.real_clip_i, s.real_dino):
        assert value == pytest.approx(1.0, abs=1e-6)
    assert s.div == pytest.approx(0.0, abs=1e-6)
    assert (s.generated, s.real, s.class_samples, s.div_kind) == (3, 2, 1, metrics.DIV_DINO)


def test_score_equals_hand_computation_on_the_embeddings(models):
    *_, clip, dino = models
    real = [random_image(i) for i in range(3)]
    gen = {"a rraj dog in the snow": [random_image(10), random_image(11)],
           "a red rraj dog": [random_image(12), random_image(13)]}
    cls = [random_image(20), random_image(21)]
    s = metrics.score(real, gen, cls, "rraj", clip, dino)

    images = [im for ims in gen.values() for im in ims]
    gc, rc = clip.images(images).numpy(), clip.images(real).numpy()
    gd, rd, cd = dino.images(images).numpy(), dino.images(real).numpy(), dino.images(cls).numpy()
    tc = clip.texts(["a dog in the snow", "a dog in the snow", "a red dog", "a red dog"]).numpy()  # token removed

    def all_pairs(xs, ys):
        return np.mean([_cos(x, y) for x in xs for y in ys])

    assert s.clip_i == pytest.approx(all_pairs(gc, rc), abs=1e-6)
    assert s.dino == pytest.approx(all_pairs(gd, rd), abs=1e-6)
    assert s.pres == pytest.approx(all_pairs(cd, rd), abs=1e-6)
    assert s.clip_t == pytest.approx(np.mean([_cos(x, y) for x, y in zip(gc, tc)]), abs=1e-6)
    assert s.div == pytest.approx(1 - (_cos(gd[0], gd[1]) + _cos(gd[2], gd[3])) / 2, abs=1e-6)
    with_token = clip.texts([p for p in gen for _ in range(2)])
    assert s.clip_t != pytest.approx(metrics.clip_t(torch.from_numpy(gc), with_token), abs=1e-4), \
        "the tiny CLIP should see a difference between prompts with and without the token"


def test_clip_embeddings_are_clips_own(models):
    """Our image/text embeddings point where CLIPModel.forward's normalised image_embeds / text_embeds do."""
    clip_dir, _, clip, _ = models
    model = CLIPModel.from_pretrained(clip_dir).eval()
    images, texts = [random_image(i, (60, 37)) for i in range(2)], ["a photo of dog", "a cat"]
    pixels = AutoImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    assert pixels.shape == (2, 3, SIZE, SIZE)  # the folder's crop size, not a hard-coded 224
    torch.testing.assert_close(metrics.unit(clip.images(images)), out.image_embeds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics.unit(clip.texts(texts)), out.text_embeds, atol=1e-6, rtol=1e-5)


def test_dino_embedding_is_the_cls_token_of_the_processed_image(models):
    """DINO's input is the image resized to the folder's square size (bilinear) with ImageNet mean/std,
    its embedding the final CLS token; rebuilt here by hand with PIL and numpy."""
    _, dino_dir, _, dino = models
    img = random_image(3, (57, 41))
    x = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float64) / 255
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    pixels = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        cls = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False)(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.images([img]), cls, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- errors

def test_missing_models_say_how_to_fetch_them(tmp_path):
    with pytest.raises(metrics.MetricModelError) as e:
        metrics.load_clip(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "hf download openai/clip-vit-base-patch32 --local-dir weights/clip-vit-base-patch32" in msg
    assert "--clip DIR" in msg and "never downloads" in msg
    with pytest.raises(metrics.MetricModelError, match="hf download someone/not-a-cached-dino --local-dir "
                                                       "weights/not-a-cached-dino"):
        metrics.load_dino("someone/not-a-cached-dino")  # a hub id: looked up in the local cache only
    default_hint = "hf download facebook/dino-vits16 --local-dir weights/dino-vits16"
    with pytest.raises(metrics.MetricModelError, match=default_hint):
        metrics.load_dino("weights/not-there")  # a local path: the hint names the default model


def test_models_under_weights_are_found(models, tmp_path, monkeypatch):
    """The download command's --local-dir (weights/<name>) is where the default name looks first."""
    clip_dir, *_ = models
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "clip-vit-base-patch32").symlink_to(clip_dir)
    monkeypatch.setattr(metrics, "REPO", tmp_path)
    assert metrics.model_source(metrics.CLIP_MODEL) == str(tmp_path / "weights" / "clip-vit-base-patch32")
    assert metrics.load_clip().images([random_image(0)]).shape == (1, 16)


def test_lpips_without_the_package_is_a_clear_error(models, monkeypatch):
    *_, clip, dino = models
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    img = random_image(0)
    with pytest.raises(metrics.MetricModelError, match="pip install lpips"):
        metrics.score([img], {"a rraj dog": [img, img]}, [], "rraj", clip, dino, div="lpips")
