"""minidream.cli.morph and sample.py --morph: SLERP endpoints and lengths, the loop closing, keyframes
equal to the plain images of their seeds (and prompts), the animated GIF / WebP."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidream.formats.models import BUNDLED_MODEL, load_model
from minidream.cli.morph import lerp, loop_positions, morph_latents, render_morph, save_animation, slerp
from minidream.pipeline import generate
from minidream.samplers import ddim

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sample

SDXL_LATENT = (1, 4, 128, 128)  # x_T of a 1024 px SDXL image: d = 65536


def angle(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return math.acos(float((a @ b / (a.norm() * b.norm())).clamp(-1, 1)))


def test_slerp_returns_the_endpoints_and_keeps_the_noise_length():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(SDXL_LATENT, generator=g), torch.randn(SDXL_LATENT, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)  # bit for bit
    d = a.numel()
    # |x| / sqrt(d) of x ~ N(0, I) has standard deviation 1 / sqrt(2 d) (0.0028 here): 4 of them is
    # a band a correct sample leaves with probability ~6e-5; linear interpolation misses it by 100x
    band = 4 / math.sqrt(2 * d)
    theta = angle(a, b)
    for t in (0.1, 0.25, 0.5, 0.75, 0.9):
        x = slerp(a, b, t)
        assert x.dtype == a.dtype and x.shape == a.shape
        length = x.double().norm().item()
        assert length == pytest.approx(((1 - t) * a.double().norm() + t * b.double().norm()).item(), rel=1e-6)
        assert abs(length / math.sqrt(d) - 1) < band  # unit variance, as the sampler expects
        assert float(angle(a, x)) == pytest.approx(float(t * theta), rel=1e-5)  # constant speed along the great circle
    midpoint = lerp(a, b, 0.5).double().norm() / math.sqrt(d)
    assert abs(midpoint - math.sqrt(0.5)) < band  # the straight line: variance 1/2 in the middle
    assert torch.allclose(slerp(a, a.clone(), 0.3), a)  # parallel inputs: no division by sin(0)


def test_the_loop_closes_without_a_jump():
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    frames = 10
    positions = loop_positions(3, frames)
    assert positions[0] == (0, 1, 0.0) and positions[-1][:2] == (2, 0)  # the last segment returns to key 0
    path = morph_latents(keys, frames)
    assert torch.equal(path[0], keys[0]) and len(path) == frames
    # the frame after the last one is key 0 again, one step along the last segment
    after_last = slerp(keys[2], keys[0], positions[-1][2] + 3 / frames)
    assert torch.allclose(after_last, keys[0], atol=1e-6)
    steps = [angle(path[k], path[(k + 1) % frames]) for k in range(frames)]
    last_segment = [s for (i, _, _), s in zip(positions, steps) if i == 2]
    assert float(steps[-1]) == pytest.approx(float(last_segment[0]), rel=1e-4)  # the wrap-around step: no jump
    with pytest.raises(ValueError, match="at least 2 keyframes"):
        loop_positions(1, 8)


@pytest.fixture(scope="module")
def model():
    return load_model(ROOT / BUNDLED_MODEL)


def test_keyframes_are_the_plain_images_of_their_seeds_and_prompts(model, tmp_path):
    options = dict(sampler=ddim, steps=2, guidance_scale=5.0)
    prompts = ["a photo of rraj person", "a painting of a dog"]
    frames = render_morph(model, prompts, [7, 8], 4, progress=False, **options)
    assert len(frames) == 4
    for frame, prompt, seed in ((frames[0], prompts[0], 7), (frames[2], prompts[1], 8)):
        plain = generate(model, prompt, seed=seed, progress=False, **options)[0]
        assert np.array_equal(np.asarray(frame), np.asarray(plain))
    assert not np.array_equal(np.asarray(frames[1]), np.asarray(frames[0]))
    for suffix in (".gif", ".webp"):
        path = save_animation(tmp_path / f"loop{suffix}", frames, fps=5)
        with Image.open(path) as im:
            assert im.n_frames == 4 and im.info["loop"] == 0
    with pytest.raises(ValueError, match="2 keyframes: give one prompt, or one per keyframe"):
        render_morph(model, prompts * 2, [7, 8], 4, progress=False)


def test_sample_cli_writes_frames_and_a_looping_gif(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--prompt", "a photo of rraj person", "--steps", "2", "--out", str(out), "--no-progress"]
    assert sample.main(argv + ["--morph", "2", "--frames", "4", "--fps", "10"]) == 0
    (out,) = out.iterdir()  # this call's own folder
    with Image.open(out / "morph.gif") as im:
        assert im.n_frames == 4 and im.info["loop"] == 0 and im.info["duration"] == 100
    assert sorted(p.name for p in (out / "morph").iterdir()) == [f"frame-{k:04d}.png" for k in range(4)]
    for bad, message in ((["--morph", "1"], "at least 2 keyframes"), (["--morph", "3", "--frames", "2"], "fewer than"),
                         (["--morph", "2", "--prompt", "a", "--prompt", "b"], "one prompt or 2"),
                         (["--morph", "2", "--num-images", "2"], "drop --num-images")):
        assert sample.main(argv + bad) == 2
        assert message in capsys.readouterr().err
