"""Text to image: prompt -> embeddings -> sampler -> VAE decode.

    prompts ──encode_prompt──> context (B, 77, 2048), pooled (B, 1280)    [text.py]
    seed ──randn (CPU generator)──> x_T (B, 4, H/8, W/8)
    x_T ──ddim / pndm (closure: UNet on [uncond; cond], guidance)──> x_0  [samplers.py]
    x_0 / scaling_factor ──VAE.decode──> image in [-1, 1] ──> PIL          [vae.py]

Every step is taken as diffusers' StableDiffusionXLPipeline takes it (noise and DDIM's eta noise
from one CPU generator seeded with `seed`, [uncond; cond] in one UNet call), so the same seed gives
the same image. The sampler is a function, k-diffusion style:
generate(model, prompt, sampler=samplers.pndm); minidream.more_samplers has Euler and
DPM-Solver++, and its SAMPLERS table names them all (sample.py --sampler, train.py --sampler)."""

from __future__ import annotations

import torch
from PIL import Image
from tqdm.auto import tqdm

from minidream import samplers
from minidream.data import to_pil
from minidream.errors import UserError
from minidream.model import Model
from minidream.text import encode_prompt, sdxl_time_ids
from minidream.vae import vae_dtype

class NonFiniteError(UserError):
    """Sampling gave inf/NaN: a broken model, LoRA or embedding, or an fp16 overflow."""


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """The VAE halves the image `log2(multiple)` times: sides must divide evenly (SDXL: by 8)."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} (the VAE's "
                         f"downsampling factor), got {height}x{width}")


def conditioning(model: Model, prompts, negative_prompt, guidance_scale: float, num_images: int,
                 height: int, width: int, embeddings=None):
    """(context, pooled, time_ids, use_cfg) for the UNet, a batch [uncond; cond] with guidance."""
    use_cfg = guidance_scale > 1.0  # as diffusers: a scale <= 1 is the plain conditional model
    context, pooled, u_context, u_pooled = encode_prompt(
        model.text, prompts, negative_prompt, guidance=use_cfg, num_images_per_prompt=num_images,
        force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)
    if embeddings is not None:
        context, pooled = (None if e is None else e.to(context) for e in embeddings)
    if use_cfg:
        context = torch.cat([u_context, context])
        pooled = None if pooled is None else torch.cat([u_pooled, pooled])
    if not model.is_sdxl:  # SD 1.x / 2.x: the UNet reads the context only
        return context, None, None, use_cfg
    # At inference SDXL is asked for an uncropped image of the output size (Podell et al. sec. 2.2).
    ids = sdxl_time_ids((height, width), (0, 0), (height, width), dtype=context.dtype)
    time_ids = ids.to(context.device).expand(context.shape[0], -1)  # (B, 6), same for both halves
    return context, pooled, time_ids, use_cfg


def unet_closure(model: Model, context, pooled, time_ids):
    """model(x, t) for the samplers: the UNet (eps or v) with its text conditioning bound in."""
    unet = model.unet
    dtype = next(unet.parameters()).dtype
    cond = [c if c is None else c.to(dtype) for c in (context, pooled, time_ids)]

    def denoiser(x, t):  # (B, 4, h, w) -> the UNet's output: eps or v, as the model was trained
        t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return unet(x.to(dtype), t, *cond).to(x.dtype)

    return denoiser


def initial_noise(model: Model, batch: int, height: int, width: int, generator: torch.Generator,
                  dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), (batch, C, H/8, W/8), drawn as diffusers draws it (embeddings' dtype, CPU)."""
    scale = model.vae_scale
    shape = (batch, model.unet.config.in_channels, height // scale, width // scale)
    return torch.randn(shape, generator=generator, dtype=dtype)


@torch.no_grad()
def sample_latents(model: Model, prompts, negative_prompt=None, *, sampler=samplers.ddim,
                   steps: int = 30, guidance_scale: float = 5.0, seed: int | list = 0,
                   height: int | None = None, width: int | None = None, num_images: int = 1,
                   eta: float = 0.0, guidance_rescale: float = 0.0, progress: bool = True,
                   initial_latents=None, embeddings=None) -> torch.Tensor:
    """Run the sampler; returns the final latents (len(prompts) * num_images, 4, H/8, W/8), still
    scaled by the VAE's scaling_factor, in prompt-major order (p0, p0, p1, p1, ...).
    seed: an int, or a list of one seed per image: each image's x_T is then drawn as that seed
    alone would draw it (class images in batches equal the same images made one at a time).
    initial_latents: x_T before the sampler's sigma scaling, instead of drawn from `seed`.
    embeddings: (context, pooled) of the conditional half instead of the prompts' (one row per
    image); the prompts then only set the batch size."""
    if eta and sampler is not samplers.ddim:
        raise ValueError(f"eta is DDIM's noise; {sampler.__name__} has none (use ddim, or eta=0)")
    height, width = height or model.default_size, width or model.default_size
    check_size(height, width, model.vae_scale)
    context, pooled, time_ids, use_cfg = conditioning(
        model, prompts, negative_prompt, guidance_scale, num_images, height, width, embeddings)
    batch = context.shape[0] // (2 if use_cfg else 1)
    seeds = seed if isinstance(seed, list) else [seed]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # CPU: same on any device
    if initial_latents is None:  # (batch, C, h, w) from one generator, or one image from each
        initial_latents = torch.cat([initial_noise(model, batch if len(seeds) == 1 else 1, height,
                                                   width, g, context.dtype) for g in generators])
    x = initial_latents.to(context.device)

    denoiser = unet_closure(model, context, pooled, time_ids)
    if use_cfg:
        denoiser = samplers.with_guidance(denoiser, guidance_scale, guidance_rescale)
    evaluations = steps + 1 if sampler is samplers.pndm else steps  # PLMS evaluates step 2 twice
    noise = dict(eta=eta, generator=generators[0]) if sampler is samplers.ddim else {}
    name = f"{sampler.__name__} x{steps}"
    with tqdm(total=evaluations, desc=name, disable=not progress, leave=False) as bar:
        return sampler(denoiser, x, model.schedule, steps, callback=lambda *_: bar.update(),
                       **noise)


@torch.no_grad()
def decode(model: Model, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents -> PIL images in vae_dtype, one at a time (1024 px in fp32 needs GBs)."""
    vae = model.vae
    dtype = vae_dtype(vae.config, next(vae.parameters()).dtype)
    vae.to(dtype)  # a no-op when load_model already chose it
    device = next(vae.parameters()).device
    if not torch.isfinite(latents).all():  # never a black image passed off as a result
        raise NonFiniteError("the sampler's latents hold inf/NaN: the model, a LoRA or an "
                             "embedding holds inf/NaN values (or fp16 overflowed: try fp32)")
    images = []
    for z in latents:
        z = z[None].to(device, dtype) / vae.config.scaling_factor  # (1, 4, h, w), unscaled
        pixels = vae.decode(z)
        if not torch.isfinite(pixels).all():
            raise NonFiniteError("the VAE's output holds inf/NaN (SDXL's own VAE overflows in "
                                 "fp16: use an fp16-fix VAE with --vae, or fp32)")
        images += to_pil(pixels)
    return images


def generate(model: Model, prompts, negative_prompt=None, **kwargs) -> list[Image.Image]:
    """Prompt(s) -> PIL images (num_images per prompt, prompt-major); options: sample_latents."""
    return decode(model, sample_latents(model, prompts, negative_prompt, **kwargs))
