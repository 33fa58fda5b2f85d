"""Encode the training images and prompts once, then train on the cached tensors.

The frozen VAE and text encoders give the same output at every step: encode once, then move them
off the GPU. A crop of a latent is not the latent of a crop (the VAE's receptive field crosses the
border), so each augmented *view* (crop, flip, SDXL time ids) is encoded on its own: 4 per subject
photo (so no one framing is learned along with the subject), 1 per class image. Each step draws a
fresh latent from the kept posterior (mean, std): Kingma & Welling 2014 reparameterisation."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from minidream.data import DataError, bucket_sizes, iter_images, make_view, nearest_bucket
from minidream.files import atomic_write
from minidream.step import Batch
from minidream.text import encode_prompt, sdxl_time_ids
from minidream.vae import vae_dtype

VIEWS_PER_INSTANCE_IMAGE = 4
VIEWS_PER_CLASS_IMAGE = 1


@dataclass
class Views:
    """Encoded augmented views of a set of images, all in one aspect bucket (one latent size)."""

    mean: torch.Tensor  # (V, 4, h, w) posterior mean (unscaled VAE latent)
    std: torch.Tensor  # (V, 4, h, w) posterior standard deviation
    time_ids: torch.Tensor  # (V, 6) float32: original h, w, crop top, left, target h, w
    image: torch.Tensor  # (V,) int64: which image of this bucket each view comes from
    prompt: torch.Tensor  # (V,) int64: its row of the prompt table (LatentCache.prompts)
    mask: torch.Tensor | None = None  # (V, 1, h, w) the subject mask on the latent grid, in [0, 1]

    @property
    def num_images(self) -> int:
        return int(self.image.max()) + 1 if self.image.numel() else 0


@dataclass
class LatentCache:
    """Everything the UNet reads during training except noise and timesteps."""

    instance: list[Views]  # one per aspect bucket the photos fall in
    classes: list[Views] | None  # classes[b]: class views in bucket b; None without a prior
    prompts: list[str]  # the prompt table: instance prompt, class prompt, captions (, "")
    context: torch.Tensor | None  # (P, L, D) one row per prompt; None: text encoders train
    pooled: torch.Tensor | None  # (P, Dp) SDXL pooled; None for SD 1.x / 2.x or not cached


# ----------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_views(vae, items, buckets: list, views_per_image: int, rng: random.Random, flip: bool,
                 center_crop=False, desc="encoding", total: int | None = None) -> list[Views]:
    """VAE-encode `views_per_image` augmented views of each (PIL image, bucket (h, w), prompt row,
    mask or None) of an iterable into one Views per bucket of `buckets`; fp32. With flip, odd
    views are flipped (a single view: at random), so flips are balanced."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    rows, count = {b: [] for b in buckets}, {b: 0 for b in buckets}
    bar = tqdm(items, desc=desc, total=total, leave=False, disable=(total or 0) < 8)
    for img, bucket, prompt, mask in bar:
        for k in range(views_per_image):
            flipped = flip and (rng.random() < 0.5 if views_per_image == 1 else k % 2 == 1)
            view = make_view(img, bucket, rng, flipped, center=center_crop, mask=mask)
            mean, logvar = vae.encode(view.pixels[None].to(device, dtype))  # (1, 4, h, w) each
            cells = None if mask is None else F.avg_pool2d(view.mask, bucket[0] // mean.shape[2])
            time_ids = sdxl_time_ids(view.original_size, view.crop_top_left, bucket)
            rows[bucket].append((mean.float().cpu(), torch.exp(0.5 * logvar.float()).cpu(),
                                 time_ids, count[bucket], prompt, cells))
        count[bucket] += 1
    if not any(rows.values()):
        raise DataError(f"no readable image to encode ({desc})")
    return [stack_views(rows[b]) for b in buckets]


def stack_views(rows: list[tuple]) -> Views:
    """(mean, std, time_ids, image, prompt, mask) rows -> one Views."""
    if not rows:
        return Views(*(torch.zeros(0, dtype=torch.long) for _ in range(5)))
    means, stds, ids, which, prompts, masks = zip(*rows)
    masks = None if masks[0] is None else torch.stack(masks)  # (V, 1, h, w)
    return Views(torch.cat(means), torch.cat(stds), torch.stack(ids), torch.tensor(which),
                 torch.tensor(prompts), masks)


def build_cache(model, instance_images, class_paths, *, resolution: int, instance_prompt: str,
                class_prompt: str, seed: int, captions=None, masks=None, buckets=True,
                empty_prompt=False, flip=True, center_crop=False, cache_text=True,
                views_per_image=VIEWS_PER_INSTANCE_IMAGE) -> LatentCache:
    """Encode the instance images ((path, PIL image) pairs, with their captions {path: caption} and
    masks, a list of PIL masks or None), the class images (paths, opened one at a time) and, if
    cache_text, every prompt, into a CPU cache. Crops, flips: Random(seed).

    Each photo goes to the aspect bucket nearest its own (data.bucket_sizes; one square bucket
    without `buckets`). Class images are the base model's squares at `resolution`, spread over the
    buckets in use in the photos' proportions (image i takes photo i's bucket, cyclically) and
    cropped to them: with its true crop in the time ids, a crop is still an image of the class as
    the model knows it (SDXL trained on such crops, sec. 2.2); drawing them at each bucket's size
    would tie the class folder to one subject's photos and cost a generation per subject."""
    vae = model.vae.to(vae_dtype(model.vae.config, next(model.vae.parameters()).dtype))
    multiple = model.vae_scale * 2 ** (len(model.unet.config.block_out_channels) - 1)
    sizes = bucket_sizes(resolution, multiple) if buckets else [(resolution, resolution)]
    photo_buckets = [nearest_bucket((img.height, img.width), sizes) for _, img in instance_images]
    used, captions = sorted(set(photo_buckets)), captions or {}
    masks = masks or [None] * len(instance_images)
    shapes = ", ".join(f"{photo_buckets.count(b)} at {b[1]}x{b[0]}" for b in used)
    print(f"photos: {shapes} px (w x h); {len(captions)} with a caption, "
          f"{sum(m is not None for m in masks)} with a mask")
    if any(m is not None for m in masks):  # a photo without a mask is all subject
        masks = [m or Image.new("L", img.size, 255) for m, (_, img) in zip(masks, instance_images)]
    # The prompt table: instance, class, the photos' captions, and "" when caption dropout trains
    # rows without a prompt; each distinct prompt once (a text embedding each).
    prompts = [instance_prompt, class_prompt, *sorted(set(captions.values()))] + [""] * empty_prompt
    prompts = list(dict.fromkeys(prompts))
    items = [(img, b, prompts.index(captions.get(path, instance_prompt)), mask)
             for (path, img), b, mask in zip(instance_images, photo_buckets, masks)]
    rng = random.Random(seed)
    instance = encode_views(vae, items, used, views_per_image, rng, flip, center_crop,
                            "encoding subject images", total=len(items))
    classes = None
    if class_paths:
        opened = enumerate(iter_images(class_paths, resolution, "class"))
        items = ((img, photo_buckets[i % len(photo_buckets)], 1, None) for i, (_, img) in opened)
        classes = encode_views(vae, items, used, VIEWS_PER_CLASS_IMAGE, rng, flip, center_crop,
                               "encoding class images", total=len(class_paths))
        if any(v.num_images == 0 for v in classes):
            raise DataError(f"the photos fall in {len(used)} aspect buckets, each needing class "
                            f"images, but {sum(v.num_images for v in classes)} could be read: "
                            "add class images (--num-class-images) or train with --no-buckets")
    context = pooled = None
    if cache_text:  # (P, L, D) and (P, Dp) or None: one row per prompt, fp32
        zeros = model.force_zeros_for_empty_prompt
        context, pooled, _, _ = encode_prompt(model.text, prompts, guidance=False,
                                              force_zeros_for_empty_prompt=zeros)
        context, pooled = context.float().cpu(), None if pooled is None else pooled.float().cpu()
    return LatentCache(instance, classes, prompts, context, pooled)


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
    for part, buckets in (("instance", cache.instance), ("class", cache.classes or [])):
        for b, views in enumerate(buckets):
            tensors.update({f"{part}.{b}.{f.name}": getattr(views, f.name) for f in fields(Views)})
    tensors.update(context=cache.context, pooled=cache.pooled)
    tensors = {k: v.contiguous() for k, v in tensors.items() if v is not None}
    metadata = {"fingerprint": fingerprint, "prompts": json.dumps(cache.prompts)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))


def load_cache(path, fingerprint: str) -> LatentCache | None:
    """The cache at `path` if it was made from the same inputs (fingerprint), else None."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("fingerprint") != fingerprint:
                return None
        saved = load_file(str(path))
    except (OSError, SafetensorError):  # missing, truncated or not a safetensors file
        return None

    def buckets(part):  # [Views per bucket], or None for a part the file does not hold
        count = len({key.split(".")[1] for key in saved if key.startswith(part + ".")})
        return [Views(*(saved.get(f"{part}.{b}.{f.name}") for f in fields(Views)))
                for b in range(count)] or None

    return LatentCache(buckets("instance"), buckets("class"), json.loads(metadata["prompts"]),
                       saved.get("context"), saved.get("pooled"))


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


def new_orders(buckets: list[Views] | None, generator: torch.Generator) -> list | None:
    """A ShuffledOrder over each bucket's images (None without class images)."""
    return None if buckets is None else [ShuffledOrder(v.num_images, generator) for v in buckets]


def draw_batch(cache: LatentCache, instance_orders: list, class_orders: list | None,
               batch_size: int, generator: torch.Generator, *, scaling_factor: float,
               num_timesteps: int, noise_offset=0.0, caption_dropout=0.0, unmasked_weight=1.0,
               sdxl=True, device="cpu") -> Batch:
    """batch_size instance rows (+ as many class rows), all in one aspect bucket, chosen with odds
    in proportion to its photos: latents drawn from the cached posteriors, noise and uniform
    timesteps, all from the CPU `generator` (the same on any device, resumable).
    noise_offset (Guttenberg 2023, "Diffusion with Offset Noise") adds offset * N(0, 1) per sample
    and channel: the model also learns to change an image's mean brightness. caption_dropout: that
    share of instance rows gets the empty prompt; unmasked_weight: the loss weight off the masks."""
    bucket = 0
    if len(cache.instance) > 1:
        counts = torch.tensor([float(v.num_images) for v in cache.instance])
        bucket = int(torch.multinomial(counts, 1, generator=generator))
    pairs = [(cache.instance[bucket], instance_orders[bucket])]
    pairs += [(cache.classes[bucket], class_orders[bucket])] if class_orders else []
    parts = [(v, _pick_views(v, order.take(batch_size), generator)) for v, order in pairs]
    mean = torch.cat([v.mean[rows] for v, rows in parts])  # (N, 4, h, w)
    std = torch.cat([v.std[rows] for v, rows in parts])
    x0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
    noise = torch.randn(x0.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(x0.shape[:2] + (1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator)
    prompt_index = torch.cat([v.prompt[rows] for v, rows in parts])  # (N,)
    if caption_dropout:
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        prompt_index[:batch_size][dropped] = cache.prompts.index("")
    time_ids = torch.cat([v.time_ids[rows] for v, rows in parts]).to(device) if sdxl else None
    instance, rows = parts[0]
    weights = None  # (n, 1, h, w): 1 on the subject, unmasked_weight elsewhere, grey between
    if instance.mask is not None:
        weights = (unmasked_weight + (1 - unmasked_weight) * instance.mask[rows]).to(device)
    return Batch(x0.to(device), noise.to(device), timesteps.to(device), time_ids,
                 prompt_index.to(device), num_instance=batch_size, pixel_weights=weights)
