"""Photos as people bring them: aspect-ratio buckets, a caption per photo, a mask per photo
(minidream.data, latent_cache, step), each checked against a hand computation."""

import csv
import json
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import minidream.training as training
from minidream import formats
from minidream.cli.args import resumed_config
from minidream.config import TrainConfig
from minidream.data import DataError, bucket_sizes, load_masks, load_subject, make_view, nearest_bucket
from minidream.formats.models import load_model
from minidream.latent_cache import build_cache, draw_batch, new_orders
from minidream.step import dreambooth_loss
from minidream.toy.tiny import write_tiny_sdxl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train as train_cli  # noqa: E402  (the CLI script at the repo root)

# SDXL's bucket table (Podell et al. 2023, app. I), (height, width) with height <= width, typed from the paper
SDXL_TABLE = [(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
              (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
              (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("m") / "tiny")


def photo(path, size, color=(200, 40, 40)):
    img = Image.new("RGB", size, color)
    img.paste((20, 200, 20), (0, 0, size[0] // 3, size[1] // 2))
    img.save(path)
    return path


def test_bucket_list_is_sdxl_table_at_1024_and_derived_the_same_way_below():
    table = sorted(set(SDXL_TABLE) | {(w, h) for h, w in SDXL_TABLE})
    assert bucket_sizes(1024, 32) == table  # 41 buckets: 20 shapes both ways, and the square
    # the tiny model (64 px, VAE / 4 and two UNet halvings: sides in multiples of 16)
    assert bucket_sizes(64, 16) == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]


@pytest.mark.parametrize("height, width, bucket", [
    (1024, 768, (1152, 896)),  # a 3:4 phone portrait
    (1920, 1080, (1344, 768)),  # 9:16
    (1080, 1920, (768, 1344)),  # 16:9
    (1000, 1000, (1024, 1024)),
    (600, 2400, (512, 2048)),  # 1:4, the widest bucket
])
def test_nearest_bucket_by_aspect_ratio(height, width, bucket):
    assert nearest_bucket((height, width), bucket_sizes(1024, 32)) == bucket


def test_view_covers_the_bucket_and_its_time_ids_are_the_true_size_and_crop():
    # a 768x1024 (w x h) portrait in the 896x1152 bucket: scale max(1152/1024, 896/768) = 7/6, so the
    # photo becomes 896 x 1195 (round(1024 * 7/6)), and the centre crop starts at (1195 - 1152) // 2 = 21
    img = Image.new("RGB", (768, 1024), (9, 9, 9))
    view = make_view(img, (1152, 896), random.Random(0), flip=False, center=True)
    assert view.pixels.shape == (3, 1152, 896)
    assert (view.original_size, view.crop_top_left) == ((1024, 768), (21, 0))
    mask = Image.new("L", (768, 1024), 0)
    mask.paste(255, (0, 0, 384, 1024))  # the left half is the subject
    flipped = make_view(img, (1152, 896), random.Random(0), flip=True, center=True, mask=mask)
    assert flipped.mask.shape == (1, 1152, 896)
    assert flipped.mask[0, :, -400:].min() == 1 and flipped.mask[0, :, :400].max() == 0  # it moved with the flip


def test_photos_fall_in_their_buckets_with_hand_computed_time_ids(model_path, tmp_path):
    """Tiny model, 64 px: a 60x100 (w x h) photo fits the 48x80 bucket exactly (scale 0.8, no crop); a
    100x70 photo goes to 80x48 (w x h): scale max(48/70, 80/100) = 0.8 gives 80x56, centre crop top 4."""
    model = load_model(model_path)
    images = [(tmp_path / "tall.png", Image.new("RGB", (60, 100))), (tmp_path / "wide.png", Image.new("RGB", (100, 70))),
              (tmp_path / "square.png", Image.new("RGB", (64, 64)))]
    cache = build_cache(model, images, [], resolution=64, instance_prompt="a photo of rraj person",
                        class_prompt="a photo of person", seed=0, flip=False, center_crop=True, views_per_image=1)
    shapes = [tuple(v.mean.shape[2:]) for v in cache.instance]  # buckets in (h, w) order, latents / 4
    assert shapes == [(12, 20), (16, 16), (20, 12)]
    assert cache.instance[2].time_ids.tolist() == [[100, 60, 0, 0, 80, 48]]
    assert cache.instance[0].time_ids.tolist() == [[70, 100, 4, 0, 48, 80]]
    assert cache.instance[1].time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    square = build_cache(model, images, [], resolution=64, instance_prompt="p", class_prompt="c", seed=0,
                         buckets=False, flip=False, center_crop=True, views_per_image=1)
    assert [tuple(v.mean.shape[2:]) for v in square.instance] == [(16, 16)]  # --no-buckets
    # 60x100 -> 64x107: top (107 - 64) // 2 = 21; 100x70 -> 91x64: left (91 - 64) // 2 = 13
    assert square.instance[0].time_ids[:, 2:4].tolist() == [[21, 0], [0, 13], [0, 0]]


def test_class_images_are_spread_over_the_buckets_in_use_and_a_batch_stays_in_one(model_path, tmp_path):
    model = load_model(model_path)
    images = [(tmp_path / f"{i}.png", Image.new("RGB", size)) for i, size in enumerate([(60, 100), (64, 64), (64, 64)])]
    class_paths = [photo(tmp_path / f"class-{i}.png", (64, 64), (10 * i, 0, 0)) for i in range(6)]
    cache = build_cache(model, images, class_paths, resolution=64, instance_prompt="p", class_prompt="c", seed=0)
    # class image i takes photo (i mod 3)'s bucket: 2 in the tall bucket, 4 in the square one, as the photos 1 : 2
    assert [v.num_images for v in cache.classes] == [4, 2] and [v.num_images for v in cache.instance] == [2, 1]
    assert cache.classes[1].time_ids[:, 4:].tolist() == [[80, 48]] * 2
    g = torch.Generator().manual_seed(0)
    orders, class_orders = new_orders(cache.instance, g), new_orders(cache.classes, g)
    seen = set()
    for _ in range(20):
        batch = draw_batch(cache, orders, class_orders, 1, g, scaling_factor=1.0, num_timesteps=1000)
        assert batch.latents.shape[0] == 2 and batch.time_ids[0, 4:].tolist() == batch.time_ids[1, 4:].tolist()
        seen.add(tuple(batch.latents.shape[2:]))
    assert seen == {(16, 16), (20, 12)}
    with pytest.raises(DataError, match="2 aspect buckets.*--no-buckets"):  # 1 class image, 2 buckets
        build_cache(model, images, class_paths[:1], resolution=64, instance_prompt="p", class_prompt="c", seed=0)


def test_captions_are_read_warned_and_cached_once_per_distinct_caption(model_path, tmp_path):
    folder = tmp_path / "raj"
    folder.mkdir()
    (folder / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    for i in range(4):
        photo(folder / f"{i:02d}.png", (64, 64), (50 * i, 0, 0))
    (folder / "00.txt").write_text("a photo of rraj person in the city\n")
    (folder / "01.txt").write_text("a photo of  rraj person in the city")  # the same caption, spaced otherwise
    (folder / "02.txt").write_text("a photo of person in the city")  # no token
    (folder / "notes.txt").write_text("not a caption: no notes.png")
    with pytest.warns(UserWarning) as warned:
        subject = load_subject(folder)
    messages = [str(w.message) for w in warned]
    assert any("without the token 'rraj'" in m and "02.txt" in m and "00.txt" not in m for m in messages)
    assert any("non-image" in m and "notes.txt" in m for m in messages)
    assert len(subject.images) == 4 and sorted(p.name for p in subject.captions) == ["00.png", "01.png", "02.png"]
    images = [(p, Image.open(p).convert("RGB")) for p in subject.images]
    cache = build_cache(load_model(model_path), images, [], resolution=64, instance_prompt=subject.instance_prompt,
                        class_prompt=subject.class_prompt, seed=0, captions=subject.captions, empty_prompt=True,
                        views_per_image=2)
    assert cache.prompts == ["a photo of rraj person", "a photo of person", "a photo of person in the city",
                             "a photo of rraj person in the city", ""]
    assert cache.context.shape[0] == 5  # one text embedding per distinct prompt
    assert cache.instance[0].prompt.tolist() == [3, 3, 3, 3, 2, 2, 0, 0]  # photo 03 has no caption
    g = torch.Generator().manual_seed(0)
    dropped = [draw_batch(cache, new_orders(cache.instance, g), None, 1, g, scaling_factor=1.0, num_timesteps=1000,
                          caption_dropout=0.5).prompt_index.item() == 4 for _ in range(200)]
    assert 70 < sum(dropped) < 130  # about half of the rows train with the empty prompt


def test_masked_loss_equals_a_hand_computation_on_a_2x2_latent():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]], [[[1.0, 1.0], [1.0, 3.0]]]])  # errors 1 4 / 0 9, 1 1 / 1 9
    weights = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])  # the instance row's weights
    loss, instance, prior = dreambooth_loss(pred, target, 1, prior_weight=0.5, pixel_weights=weights)
    assert instance.item() == pytest.approx((1 * 1 + 0.5 * 4) / 1.5)  # 2.0: the weighted mean
    assert prior.item() == pytest.approx(3.0) and loss.item() == pytest.approx(2.0 + 0.5 * 3.0)
    ones, _, _ = dreambooth_loss(pred, target, 1, pixel_weights=torch.ones(1, 1, 2, 2))
    plain, _, _ = dreambooth_loss(pred, target, 1)
    assert ones.item() == pytest.approx(plain.item())  # a white mask changes nothing
    two_channels, _, _ = dreambooth_loss(pred.repeat(1, 2, 1, 1), target.repeat(1, 2, 1, 1), 1, 0.5, None, weights)
    assert two_channels.item() == pytest.approx(loss.item())


def test_mask_weights_reach_the_batch_on_the_latent_grid(model_path, tmp_path):
    img = Image.new("RGB", (64, 64), (100, 100, 100))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half
    cache = build_cache(load_model(model_path), [(tmp_path / "a.png", img)], [], resolution=64, instance_prompt="p",
                        class_prompt="c", seed=0, masks=[mask], flip=False, views_per_image=1)
    g = torch.Generator().manual_seed(0)
    batch = draw_batch(cache, new_orders(cache.instance, g), None, 1, g, scaling_factor=1.0, num_timesteps=1000,
                       unmasked_weight=0.1)
    expected = torch.full((1, 1, 16, 16), 0.1)
    expected[..., :8] = 1.0  # latent cells are 4x4 pixels: the left 8 columns are all subject
    assert torch.allclose(batch.pixel_weights, expected)


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (32, 64), 255), "is 32x64 but 00.png is 64x64 as shown: make the mask the photo's size"),
    (Image.new("L", (64, 64), 0), "is all black (no subject)"),
])
def test_a_wrong_mask_is_one_error_line(model_path, tmp_path, capsys, mask, message):
    folder = tmp_path / "raj"
    folder.mkdir()
    (folder / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    photo(folder / "00.png", (64, 64))
    mask.save(folder / "00-masklabel.png")
    with pytest.raises(DataError, match="00-masklabel.png"):
        load_masks([(folder / "00.png", Image.open(folder / "00.png"))], load_subject(folder).masks)
    argv = ["--subject", str(folder), "--model", str(model_path), "--out", str(tmp_path / "runs"), "--no-prior"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and message in err, err
    assert "00-masklabel.png" in err and not (tmp_path / "runs").exists()  # refused before any run folder


def test_resume_is_bit_exact_with_buckets_captions_and_masks(model_path, tmp_path, monkeypatch):
    folder = tmp_path / "raj"
    folder.mkdir()
    (folder / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    for i, size in enumerate([(60, 100), (64, 64), (100, 70)]):  # three buckets
        photo(folder / f"{i:02d}.png", size, (60 * i, 90, 90))
        mask = Image.new("L", size, 0)
        mask.paste(255 - 100 * (i == 1), (size[0] // 4, size[1] // 4, size[0] // 2, size[1]))  # grey for photo 01
        mask.save(folder / f"{i:02d}-masklabel.png")
    (folder / "00.txt").write_text("a photo of rraj person in the city")
    settings = dict(subject=str(folder), model=str(model_path), class_dir=str(tmp_path / "class"), steps=6,
                    num_class_images=3, validate_every=0, save_every=3, keep_checkpoints=0, log_every=1,
                    class_steps=2, views_per_image=2, caption_dropout=0.3, unmasked_weight=0.2, score=False)
    whole = training.train(TrainConfig(out=str(tmp_path / "a"), **settings), models=formats)
    real_apply, calls = training.apply_gradients, {"n": 0}

    def stop_in_step_3(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real_apply(*args, **kw)

    monkeypatch.setattr(training, "apply_gradients", stop_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        training.train(TrainConfig(out=str(tmp_path / "b"), **settings), models=formats)
    monkeypatch.setattr(training, "apply_gradients", real_apply)
    (run,) = (tmp_path / "b").glob("raj-*")
    training.train(resumed_config(TrainConfig(resume=str(run))), models=formats)
    assert losses(run) == losses(whole) and len(losses(whole)) == 6


def losses(run: Path) -> list[tuple[str, ...]]:
    with open(run / "loss.csv") as f:
        return [(r["step"], r["loss"], r["instance_loss"], r["prior_loss"], r["lr"]) for r in csv.DictReader(f)]
