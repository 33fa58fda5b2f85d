"""Encode the training images and prompts once, then train on the cached tensors.

The frozen VAE and text encoders give the same output at every step: encode once, then move them
off the GPU. A crop of a latent is not the latent of a crop (the VAE's receptive field crosses the
border), so each augmented *view* (crop, flip, SDXL time ids) is encoded on its own: 4 per subject
photo (so no one framing is learned along with the subject), 1 per class image. Each step draws a
fresh latent from the kept posterior (mean, std): Kingma & Welling 2014 reparameterisation."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from minidream.data import DataError, iter_images, make_view
from minidream.files import atomic_write
from minidream.step import Batch
from minidream.text import encode_prompt, sdxl_time_ids
from minidream.vae import vae_dtype

VIEWS_PER_INSTANCE_IMAGE = 4
VIEWS_PER_CLASS_IMAGE = 1


@dataclass
class Views:
    """Encoded augmented views of a set of images, all at one resolution."""

    mean: torch.Tensor  # (V, 4, h, w) posterior mean (unscaled VAE latent)
    std: torch.Tensor  # (V, 4, h, w) posterior standard deviation
    time_ids: torch.Tensor  # (V, 6) float32: original h, w, crop top, left, target h, w
    image: torch.Tensor  # (V,) int64: which image each view comes from

    @property
    def num_images(self) -> int:
        return int(self.image.max()) + 1 if self.image.numel() else 0


@dataclass
class LatentCache:
    """Everything the UNet reads during training except noise and timesteps."""

    instance: Views
    classes: Views | None  # None without prior preservation
    context: torch.Tensor | None  # (2, L, D): instance, class prompt; None: text encoders train
    pooled: torch.Tensor | None  # (2, Dp) SDXL pooled; None for SD 1.x / 2.x or not cached


# ----------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_views(vae, images, resolution: int, views_per_image: int, rng: random.Random, flip: bool,
                 center_crop=False, desc="encoding", total: int | None = None) -> Views:
    """VAE-encode `views_per_image` augmented views of each (path, PIL image) of an iterable; fp32
    cache. With flip, odd views are flipped (a single view: at random), so flips are balanced."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    rows = []
    total = len(images) if total is None else total
    bar = tqdm(images, desc=desc, total=total, leave=False, disable=total < 8)
    for i, (_, img) in enumerate(bar):
        for k in range(views_per_image):
            flipped = flip and (rng.random() < 0.5 if views_per_image == 1 else k % 2 == 1)
            view = make_view(img, resolution, rng, flipped, center=center_crop)
            mean, logvar = vae.encode(view.pixels[None].to(device, dtype))  # (1, 4, h, w) each
            time_ids = sdxl_time_ids(view.original_size, view.crop_top_left, [resolution] * 2)
            rows.append((mean.float().cpu(), torch.exp(0.5 * logvar.float()).cpu(), time_ids, i))
    if not rows:
        raise DataError(f"no readable image to encode ({desc})")
    means, stds, ids, which = zip(*rows)
    return Views(torch.cat(means), torch.cat(stds), torch.stack(ids), torch.tensor(which))


def build_cache(model, instance_images, class_paths, *, resolution: int, instance_prompt: str,
                class_prompt: str, seed: int, flip=True, center_crop=False, cache_text=True,
                views_per_image=VIEWS_PER_INSTANCE_IMAGE) -> LatentCache:
    """Encode the instance images ((path, PIL image) pairs), the class images (paths, opened one at
    a time) and, if cache_text, the two prompts, into a CPU cache. Crops, flips: Random(seed)."""
    vae = model.vae.to(vae_dtype(model.vae.config, next(model.vae.parameters()).dtype))
    rng = random.Random(seed)
    instance = encode_views(vae, instance_images, resolution, views_per_image, rng, flip,
                            center_crop, "encoding subject images")
    classes = encode_views(vae, iter_images(class_paths, resolution, "class"), resolution,
                           VIEWS_PER_CLASS_IMAGE, rng, flip, center_crop, "encoding class images",
                           total=len(class_paths)) if class_paths else None
    context = pooled = None
    if cache_text:  # (2, L, D) and (2, Dp) or None: [instance prompt, class prompt], fp32
        zeros = model.force_zeros_for_empty_prompt
        context, pooled, _, _ = encode_prompt(model.text, [instance_prompt, class_prompt],
                                              guidance=False, force_zeros_for_empty_prompt=zeros)
        context, pooled = context.float().cpu(), None if pooled is None else pooled.float().cpu()
    return LatentCache(instance, classes, context, pooled)


def offload_encoders(model, keep_text: bool = False) -> None:
    """Move the VAE (and the text encoders unless they train) to the CPU and release GPU memory."""
    text = [] if keep_text else [model.text.text_encoder, model.text.text_encoder_2]
    for module in [model.vae, *text]:
        if module is not None:
            module.to("cpu")
    torch.cuda.empty_cache()  # a no-op where CUDA was never used


# ----------------------------------------------------------------------------- file

def save_cache(path, cache: LatentCache, fingerprint: str) -> None:
    """Write the cache (safetensors, atomically): a resumed run reads it back and trains on
    bit-identical latents even where GPU convolutions are not deterministic."""
    tensors = {}
    for part, views in (("instance", cache.instance), ("class", cache.classes)):
        if views is not None:
            tensors.update({f"{part}.{f.name}": getattr(views, f.name) for f in fields(Views)})
    tensors.update(context=cache.context, pooled=cache.pooled)
    tensors = {k: v.contiguous() for k, v in tensors.items() if v is not None}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), {"fingerprint": fingerprint}))


def load_cache(path, fingerprint: str) -> LatentCache | None:
    """The cache at `path` if it was made from the same inputs (fingerprint), else None."""
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
        saved = load_file(str(path))
    except (OSError, SafetensorError):  # missing, truncated or not a safetensors file
        return None

    def views(part):  # None for a part the file does not hold (no class images)
        names = [f"{part}.{f.name}" for f in fields(Views)]
        return Views(*(saved[name] for name in names)) if names[0] in saved else None

    return LatentCache(views("instance"), views("class"), saved.get("context"), saved.get("pooled"))


# ----------------------------------------------------------------------------- batches

class ShuffledOrder:
    """Endless passes over n items, each a fresh permutation by `generator` (checkpointed)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.order, self.pos = [], 0  # the current pass, and the position in it

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.generator).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = list(state["order"]), int(state["pos"])


def _pick_views(views: Views, images: list[int], generator: torch.Generator) -> torch.Tensor:
    """One random cached view (row index) of each image."""
    candidates = [torch.nonzero(views.image == img).flatten() for img in images]  # its rows
    return torch.stack([c[torch.randint(len(c), (1,), generator=generator)][0] for c in candidates])


def draw_batch(cache: LatentCache, instance_order: ShuffledOrder, class_order: ShuffledOrder | None,
               batch_size: int, generator: torch.Generator, *, scaling_factor: float,
               num_timesteps: int, noise_offset=0.0, sdxl=True, device="cpu") -> Batch:
    """batch_size instance rows (+ as many class rows): latents drawn from the cached posteriors,
    noise and uniform timesteps, all from the CPU `generator` (the same on any device, resumable).
    noise_offset (Guttenberg 2023, "Diffusion with Offset Noise") adds offset * N(0, 1) per sample
    and channel: the model also learns to change an image's mean brightness."""
    pairs = ((cache.instance, instance_order), (cache.classes, class_order))
    parts = [(v, _pick_views(v, order.take(batch_size), generator)) for v, order in pairs if order]
    mean = torch.cat([v.mean[rows] for v, rows in parts])  # (N, 4, h, w)
    std = torch.cat([v.std[rows] for v, rows in parts])
    x0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
    noise = torch.randn(x0.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(x0.shape[:2] + (1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator)
    prompt_index = torch.tensor([0] * batch_size + [1] * (x0.shape[0] - batch_size))
    time_ids = torch.cat([v.time_ids[rows] for v, rows in parts]).to(device) if sdxl else None
    return Batch(x0.to(device), noise.to(device), timesteps.to(device), time_ids,
                 prompt_index.to(device), num_instance=batch_size)
