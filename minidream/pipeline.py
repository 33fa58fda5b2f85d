"""Text to image: prompt -> embeddings -> sampler -> VAE decode.

    prompts ──encode_prompt──> context (B, 77, 2048), pooled (B, 1280)    [text.py]
    seed ──randn (CPU generator)──> x_T (B, 4, H/8, W/8)
    x_T ──ddim / pndm (closure: UNet on [uncond; cond], guidance)──> x_0  [samplers.py]
    x_0 / scaling_factor ──VAE.decode──> image in [-1, 1] ──> PIL          [vae.py]

Every step matches diffusers' StableDiffusionXLPipeline, so the same seed gives the same image:
the initial noise is one torch.randn of shape (B, 4, H/8, W/8) from a CPU torch.Generator seeded
with `seed`, times the sampler's initial sigma; for DDIM with eta > 0 the sampler draws its
noise from that same generator afterwards.
"""

from __future__ import annotations

import torch
from PIL import Image
from tqdm.auto import tqdm

from minidream import samplers
from minidream.data import to_pil
from minidream.model import Model
from minidream.text import encode_prompt, sdxl_time_ids
from minidream.vae import vae_dtype

SAMPLERS = {"ddim": samplers.ddim, "pndm": samplers.pndm, "euler": samplers.euler}


def check_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")


def unet_closure(model: Model, context, pooled, time_ids):
    """model(x, t) for the samplers: the UNet with its text conditioning bound in."""
    unet = model.unet
    dtype = next(unet.parameters()).dtype

    def eps(x, t):
        t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return unet(x.to(dtype), t, context.to(dtype), pooled, time_ids).to(x.dtype)

    return eps


def conditioning(model: Model, prompts, negative_prompt, guidance_scale: float, num_images: int, height: int, width: int):
    """(context, pooled, time_ids) for the UNet; with guidance the batch is [uncond; cond]."""
    use_cfg = guidance_scale > 1.0  # as diffusers: scale <= 1 is the plain conditional model
    context, pooled, u_context, u_pooled = encode_prompt(
        model.text, prompts, negative_prompt, guidance=use_cfg,
        force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt, num_images_per_prompt=num_images,
    )
    if use_cfg:
        context = torch.cat([u_context, context])
        pooled = None if pooled is None else torch.cat([u_pooled, pooled])
    time_ids = None
    if model.is_sdxl:
        # at inference SDXL is asked for an uncropped image of the output size
        ids = sdxl_time_ids((height, width), (0, 0), (height, width), dtype=context.dtype)
        time_ids = ids.to(context.device).expand(context.shape[0], -1)  # (B, 6)
    else:
        pooled = None
    return context, pooled, time_ids, use_cfg


@torch.no_grad()
def sample_latents(model: Model, prompts, negative_prompt=None, *, sampler: str = "ddim", steps: int = 30,
                   guidance_scale: float = 5.0, seed: int = 0, height: int | None = None,
                   width: int | None = None, num_images: int = 1, eta: float = 0.0,
                   guidance_rescale: float = 0.0, progress: bool = True, initial_latents=None) -> torch.Tensor:
    """Run the sampler; returns final latents (B * num_images, 4, H/8, W/8), still scaled."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    height, width = height or model.default_size, width or model.default_size
    check_size(height, width, model.vae_scale)
    context, pooled, time_ids, use_cfg = conditioning(model, prompts, negative_prompt, guidance_scale,
                                                      num_images, height, width)
    batch = context.shape[0] // (2 if use_cfg else 1)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, model.unet.config.in_channels, height // model.vae_scale, width // model.vae_scale)
    if initial_latents is None:
        initial_latents = torch.randn(shape, generator=generator, dtype=context.dtype)
    x = initial_latents.to(context.device) * samplers.init_noise_sigma(model.schedule, steps, sampler)

    eps = unet_closure(model, context, pooled, time_ids)
    if use_cfg:
        eps = samplers.with_guidance(eps, guidance_scale, guidance_rescale)
    evaluations = steps + 1 if sampler == "pndm" else steps  # PLMS evaluates its first pair twice
    bar = tqdm(total=evaluations, desc=f"{sampler} x{steps}", disable=not progress, leave=False)
    kwargs = dict(eta=eta, generator=generator) if sampler == "ddim" else {}
    x = SAMPLERS[sampler](eps, x, model.schedule, steps, callback=lambda *_: bar.update(), **kwargs)
    bar.close()
    return x


@torch.no_grad()
def decode(model: Model, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents -> PIL images. The SDXL VAE overflows in fp16 (NaN -> black images), so it
    runs in fp32 unless its config says it is fp16-safe (vae_dtype, force_upcast)."""
    vae = model.vae
    dtype = vae_dtype(vae.config, next(vae.parameters()).dtype)
    if next(vae.parameters()).dtype != dtype:
        vae.to(dtype)
    images = vae.decode(latents.to(dtype) / vae.config.scaling_factor)
    return to_pil(images)


def generate(model: Model, prompts, negative_prompt=None, **kwargs) -> list[Image.Image]:
    """Prompt(s) -> PIL images (num_images per prompt, prompt-major). See sample_latents for options."""
    return decode(model, sample_latents(model, prompts, negative_prompt, **kwargs))
