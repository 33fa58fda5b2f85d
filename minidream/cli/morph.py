"""A looping morph animation: spherical interpolation between several seeds' starting noise.

    seeds s0 .. s(N-1) -> x_T^0 .. x_T^(N-1)       (the initial latents sample.py would use)
    frame k of F: s = k N / F, segment i = floor(s), t = s - i
        x_T = slerp(x_T^i, x_T^(i+1 mod N), t)      -> sampler -> VAE -> frame
    frames -> animated GIF / WebP; after frame F-1 comes frame 0 again (segment N-1 ends at x_T^0)

Why spherical: the sampler expects x_T ~ N(0, I). In d = 4 x 128 x 128 dimensions (SDXL) such a
vector has length ~sqrt(d), and two independent ones are almost orthogonal. The straight line
between them passes ||(a + b) / 2|| ~ sqrt(d / 2) at its middle: noise of variance 1/2, which
the sampler turns into washed-out, blurry frames. The great circle keeps the length (White 2016,
"Sampling Generative Networks", recommends slerp for exactly this). `slerp` is Shoemake's formula
(Shoemake 1985, "Animating Rotation with Quaternion Curves", SIGGRAPH, the Slerp of its section on
interpolating quaternions) applied to the two directions, with the length interpolated linearly:
equal to Shoemake's slerp when both lengths are equal, and the length never leaves the range
between the two. With several prompts (one per keyframe), the prompt embeddings are interpolated
linearly with the same (i, t): they are not Gaussian samples, so there is no length to keep.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from minidream.files import atomic_write, save_png
from minidream.pipeline import decode, initial_noise, sample_latents
from minidream.text import encode_prompt

FORMATS = {".gif": "GIF", ".webp": "WEBP"}


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1), through the whole tensors as vectors.

    With u = a / |a|, v = b / |b| and cos(theta) = u . v (Shoemake 1985):
        direction = sin((1 - t) theta) / sin(theta) u + sin(t theta) / sin(theta) v
        result    = ((1 - t) |a| + t |b|) direction
    In float64, so t = 0 and t = 1 give back a and b exactly (after rounding to their dtype).
    Nearly parallel inputs (sin(theta) < eps) fall back to the straight line, where both agree.
    """
    x, y = a.double().flatten(), b.double().flatten()
    ra, rb = x.norm(), y.norm()
    u, v = x / ra, y / rb
    theta = torch.arccos((u @ v).clamp(-1.0, 1.0))
    if torch.sin(theta) < eps:
        direction = (1 - t) * u + t * v
        direction = direction / direction.norm()
    else:
        direction = (torch.sin((1 - t) * theta) * u + torch.sin(t * theta) * v) / torch.sin(theta)
    return (((1 - t) * ra + t * rb) * direction).reshape(a.shape).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return (a.double() + t * (b.double() - a.double())).to(a.dtype)


def loop_positions(num_keys: int, frames: int) -> list[tuple[int, int, float]]:
    """(from key, to key, t) of each frame of a loop through num_keys keyframes in `frames` frames.

    Frames are evenly spaced in s = k * num_keys / frames in [0, num_keys); the last segment runs
    from the last key back to the first, and s = num_keys (the frame after the last) is key 0:
    the animation loops without a jump. Key j is itself a frame when j * frames / num_keys is whole.
    """
    if num_keys < 2 or frames < num_keys:
        raise ValueError(f"a morph needs at least 2 keyframes and at least one frame per keyframe "
                         f"(got {num_keys} keyframes, {frames} frames)")
    out = []
    for k in range(frames):
        s = k * num_keys / frames
        i = math.floor(s)
        out.append((i, (i + 1) % num_keys, s - i))
    return out


def morph_latents(keys: list[torch.Tensor], frames: int) -> list[torch.Tensor]:
    """The initial latents of every frame (slerp between consecutive keys, looping)."""
    return [slerp(keys[i], keys[j], t) for i, j, t in loop_positions(len(keys), frames)]


@torch.no_grad()
def render_morph(model, prompts: list[str], seeds: list[int], frames: int, *, negative_prompt=None,
                 height: int | None = None, width: int | None = None, progress: bool = True,
                 **sampling) -> list[Image.Image]:
    """The frames of a loop through the keyframes (seed i, prompt i); one prompt serves all keys.

    sampling: sampler, steps, guidance_scale (see pipeline.sample_latents); DDIM's eta must stay 0,
    a frame's noise is all in its x_T. A keyframe's frame is the image `seed` alone gives.
    """
    if len(prompts) not in (1, len(seeds)):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} keyframes: give one prompt, or one per keyframe")
    if sampling.get("eta"):
        raise ValueError("a morph needs deterministic sampling: eta must be 0 (each frame's noise is its x_T)")
    height, width = height or model.default_size, width or model.default_size
    dtype = model.text.output_encoder.dtype  # what sample_latents draws its noise in
    keys = [initial_noise(model, 1, height, width, torch.Generator().manual_seed(s), dtype) for s in seeds]
    texts = None
    if len(set(prompts)) > 1:
        texts = [encode_prompt(model.text, p, guidance=False)[:2] for p in prompts]  # (context, pooled) per key
    images = []
    for i, j, t in tqdm(loop_positions(len(keys), frames), desc="morph frames", disable=not progress):
        embeddings = None
        if texts is not None:
            embeddings = tuple(None if a is None else lerp(a, b, t) for a, b in zip(texts[i], texts[j]))
        latents = sample_latents(model, prompts[i % len(prompts)], negative_prompt, height=height, width=width,
                                 initial_latents=slerp(keys[i], keys[j], t), embeddings=embeddings,
                                 progress=False, **sampling)
        images += decode(model, latents)
    return images


def save_animation(path, frames: list[Image.Image], fps: float) -> Path:
    """An endlessly looping GIF or WebP (by the file's suffix), `fps` frames per second."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: the animation must be a .gif or .webp file")
    duration = round(1000 / fps)  # ms per frame (GIF stores hundredths of a second)
    options = dict(format=FORMATS[path.suffix.lower()], save_all=True, append_images=frames[1:], duration=duration,
                   loop=0)  # loop=0: forever
    return atomic_write(path, lambda tmp: frames[0].save(tmp, **options))


def write_morph(model, prompts: list[str], seeds: list[int], out: Path, frames: int, fps: float, animation: str,
                metadata: dict[str, str], **options) -> list[Path]:
    """sample.py --morph: the frames as OUT/morph/frame-NNNN.png, then the loop as OUT/morph.ANIMATION
    (gif or webp). metadata: the settings each PNG carries; options: see render_morph."""
    images = render_morph(model, prompts, seeds, frames, **options)
    metadata = metadata | {"prompts": "\n".join(prompts), "seeds": " ".join(map(str, seeds)), "frames": str(frames)}
    written = [save_png(out / "morph" / f"frame-{k:04d}.png", image, metadata | {"frame": str(k)})
               for k, image in enumerate(images)]
    return written + [save_animation(out / f"morph.{animation}", images, fps)]
