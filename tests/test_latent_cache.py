"""minidream.latent_cache: augmented views encoded once, batches drawn from them, the cache file."""

import random

import pytest
import torch
from PIL import Image

from minidream.toy.tiny import write_tiny_sdxl
from minidream.data import make_view
from minidream.latent_cache import (LatentCache, ShuffledOrder, draw_batch, encode_views, load_cache, save_cache)
from minidream.formats.models import load_model


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return load_model(write_tiny_sdxl(tmp_path_factory.mktemp("m") / "tiny")).vae


def image(size, color):
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 0), (0, 0, size[0] // 3, size[1]))  # asymmetric: a flip changes the pixels
    return img


def square(images, side=32, prompt=0):
    """encode_views' items: every image in the one square bucket, with one prompt, no mask."""
    return [(img, (side, side), prompt, None) for _, img in images]


def test_views_are_encoded_crops_with_their_time_ids(vae):
    images = [("a.png", image((40, 36), (10, 20, 30))), ("b.png", image((32, 48), (200, 0, 0)))]
    [views] = encode_views(vae, square(images), [(32, 32)], 4, random.Random(0), flip=True)
    side = 32 // 2 ** (len(vae.config.block_out_channels) - 1)  # latent side at 32 px
    assert views.mean.shape == views.std.shape == (8, 4, side, side) and (views.std > 0).all()
    assert views.image.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    ids = views.time_ids  # (orig_h, orig_w, top, left, 32, 32)
    assert ids[:4, :2].tolist() == [[36.0, 40.0]] * 4 and ids[4:, :2].tolist() == [[48.0, 32.0]] * 4
    assert (ids[:, 4:] == 32).all() and (ids[:4, 2] == 0).all() and (ids[4:, 3] == 0).all()
    # replay the same random crops: view k of image 0 is VAE.encode(make_view(...)), odd k flipped
    rng = random.Random(0)
    for k in range(4):
        view = make_view(images[0][1], (32, 32), rng, flip=k % 2 == 1)
        with torch.no_grad():
            mean, logvar = vae.encode(view.pixels[None])
        assert torch.equal(views.mean[k], mean[0]) and torch.allclose(views.std[k], torch.exp(0.5 * logvar[0]))
        assert ids[k, 2:4].tolist() == list(map(float, view.crop_top_left))
    assert not torch.equal(views.mean[0], views.mean[1])  # flipped and unflipped views differ


def test_batches_are_drawn_from_the_generator_only(vae):
    [inst] = encode_views(vae, square([("a", image((40, 36), (0, 0, 0))), ("b", image((36, 36), (9, 9, 9)))]),
                          [(32, 32)], 2, random.Random(0), flip=True)
    [cls] = encode_views(vae, square([(str(i), image((32, 32), (20 * i, 0, 0))) for i in range(3)], prompt=1),
                         [(32, 32)], 1, random.Random(1), flip=True)
    cache = LatentCache([inst], [cls], ["a", "b"], torch.zeros(2, 77, 128), torch.zeros(2, 64))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return draw_batch(cache, [ShuffledOrder(2, g)], [ShuffledOrder(3, g)], 2, g, scaling_factor=0.5,
                          num_timesteps=1000, noise_offset=0.1)

    a, b, c = draw(0), draw(0), draw(1)
    side = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    assert a.latents.shape == a.noise.shape == (4, 4, side, side) and a.time_ids.shape == (4, 6)
    assert a.prompt_index.tolist() == [0, 0, 1, 1] and a.num_instance == 2
    assert all(torch.equal(x, y) for x, y in [(a.latents, b.latents), (a.noise, b.noise), (a.timesteps, b.timesteps)])
    assert not torch.equal(a.noise, c.noise)
    # with the posterior's std set to 0, each row is exactly a cached view's mean times the scale
    inst.std.zero_()
    cls.std.zero_()
    d = draw(0)
    assert d.timesteps.tolist() == a.timesteps.tolist()  # same draws in the same order
    for row, (views, n) in enumerate([(inst, 4), (inst, 4), (cls, 3), (cls, 3)]):
        matches = [i for i in range(n) if torch.equal(d.latents[row], views.mean[i] * 0.5)]
        assert len(matches) == 1
        assert torch.equal(d.time_ids[row], views.time_ids[matches[0]])
    assert not torch.equal(d.latents[2], d.latents[3])  # two different class images


def test_shuffled_order_visits_every_item_once_per_pass():
    order = ShuffledOrder(5, torch.Generator().manual_seed(0))
    first, second = order.take(5), order.take(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    state = order.state_dict()
    again = ShuffledOrder(5, torch.Generator())
    again.load_state_dict(state)
    assert again.take(0) == [] and (again.order, again.pos) == (order.order, order.pos)


def test_cache_file_round_trip_and_fingerprint(vae, tmp_path):
    views = encode_views(vae, square([("a", image((40, 36), (0, 0, 0)))]), [(32, 32)], 2, random.Random(0), flip=True)
    cache = LatentCache(views, None, ["a photo of rraj person", ""], torch.randn(2, 77, 128), None)
    save_cache(tmp_path / "cache.safetensors", cache, "fp-1")
    back = load_cache(tmp_path / "cache.safetensors", "fp-1")
    assert torch.equal(back.instance[0].mean, views[0].mean) and torch.equal(back.context, cache.context)
    assert back.prompts == cache.prompts and back.instance[0].mask is None
    assert back.classes is None and back.pooled is None
    assert load_cache(tmp_path / "cache.safetensors", "fp-2") is None  # other inputs: re-encode
    (tmp_path / "cache.safetensors").write_bytes(b"truncated")
    assert load_cache(tmp_path / "cache.safetensors", "fp-1") is None
    assert load_cache(tmp_path / "missing.safetensors", "fp-1") is None
