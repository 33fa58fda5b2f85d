"""minidream.pipeline against diffusers' StableDiffusionXLPipeline on a tiny random SDXL.

The model is written by the test with minidream.toy.tiny in the real SDXL repo layout; diffusers loads
it with its own from_pretrained, minidream with load_model. The same prompt, negative, seed, steps,
guidance and size must give the same final latents (<= 1e-4 relative) and the same pixels (within
1/255) for every sampler, with its scheduler built from the folder's scheduler config.
"""

import shutil

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionXLPipeline)

from checkpoint_fixtures import write_single_file
from lora_models import write_random_lora
from minidream import samplers
from minidream.cli.sample_command import SAMPLERS
from minidream.more_samplers import dpmpp_2m_karras
from minidream.formats.lora_files import add_loras
from minidream import formats
from minidream.formats.models import load_model
from minidream.pipeline import check_size, decode, generate, sample_latents
from minidream.toy.tiny import write_tiny_sdxl

LATENT_TOL = 1e-4  # max |ours - theirs| / max |theirs|
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
              "dpmpp-2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("pipeline") / "tiny-sdxl", seed=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(folder):
    return load_model(folder)


def reference(folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def theirs(folder):
    return reference(folder)


def diffusers_run(pipe, sampler, prompts, negative, output_type, *, seed, steps, guidance, height, width,
                  num_images=1, eta=0.0, karras=False):
    # PNDM from an Euler config keeps skip_prk_steps=True (SDXL's config sets it), the PLMS start.
    # use_karras_sigmas is given every time: an earlier karras run leaves it in the config, for Euler too.
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config, use_karras_sigmas=karras)
    extra = {"eta": eta} if sampler == "ddim" else {}
    out = pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               height=height, width=width, num_images_per_prompt=num_images, output_type=output_type,
               generator=torch.Generator().manual_seed(seed), **extra)
    return out.images


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


BASE = dict(seed=0, steps=8, guidance=5.0, height=64, width=64)
CASES = {
    "ddim": ("ddim", ["a photo of rraj person"], None, {}),
    "pndm": ("pndm", ["a photo of rraj person"], None, {}),
    "euler": ("euler", ["a photo of rraj person"], None, {}),
    "dpmpp-2m": ("dpmpp-2m", ["a photo of rraj person"], None, {}),
    "dpmpp-2m --karras, negative": ("dpmpp-2m", ["a photo of rraj person"], "blurry", {"karras": True, "seed": 2}),
    "ddim eta, negative": ("ddim", ["a photo of rraj person"], "blurry, low quality", {"eta": 0.8, "seed": 7}),
    "pndm batch, negatives, 2 each": ("pndm", ["a photo of rraj person", "a painting of a dog at the beach"],
                                      ["ugly", "blurry"], {"num_images": 2, "seed": 3}),
    "ddim 2 images, non-square": ("ddim", ["a red car in the snow"], "", {"num_images": 2, "height": 48, "width": 80}),
    "pndm no guidance": ("pndm", ["a photo of rraj person"], None, {"guidance": 1.0, "steps": 5}),
}


@pytest.mark.parametrize("case", CASES)
def test_generation_matches_diffusers(ours, theirs, case):
    sampler, prompts, negative, kw = CASES[case]
    kw = BASE | kw
    want_latents = diffusers_run(theirs, sampler, prompts, negative, "latent", **kw)
    want_images = diffusers_run(theirs, sampler, prompts, negative, "pil", **kw)
    options = dict(sampler=dpmpp_2m_karras if kw.get("karras") else SAMPLERS[sampler], steps=kw["steps"], guidance_scale=kw["guidance"], seed=kw["seed"],
                   height=kw["height"], width=kw["width"], num_images=kw.get("num_images", 1),
                   eta=kw.get("eta", 0.0), progress=False)
    latents = sample_latents(ours, prompts, negative, **options)
    images = decode(ours, latents)
    n = len(prompts) * kw.get("num_images", 1)
    assert latents.shape == want_latents.shape == (n, 4, kw["height"] // ours.vae_scale, kw["width"] // ours.vae_scale)
    err = rel_err(latents, want_latents)
    diff = np.abs(pixels(images) - pixels(want_images)).max()
    print(f"{case}: latents rel err {err:.2e}, max pixel diff {diff}/255")
    assert err <= LATENT_TOL
    assert diff <= 1
    assert images[0].size == (kw["width"], kw["height"])


def test_seed_and_negative_change_the_image(ours):
    # Guards the parity test itself: the inputs it compares really steer the result.
    run = lambda **kw: sample_latents(ours, "a photo of rraj person", **({"steps": 4, "progress": False} | kw))  # noqa: E731
    base = run()
    assert rel_err(run(seed=1), base) > 1e-2
    assert rel_err(run(negative_prompt="blurry"), base) > 1e-3
    assert rel_err(run(guidance_scale=1.0), base) > 1e-3
    assert torch.equal(run(), base)  # and the same seed gives the same latents


def test_single_file_copy_gives_the_same_image(folder, ours, theirs, tmp_path):
    """The same weights as one SGM single file (written through diffusers' converters run backwards)."""
    models = {"unet": theirs.unet, "vae": theirs.vae, "text_encoder": theirs.text_encoder,
              "text_encoder_2": theirs.text_encoder_2}
    file = tmp_path / "tiny_sdxl.safetensors"
    write_single_file(models, file)
    single = formats.load_model(file, tokenizer=folder)  # single files carry no tokenizer
    options = dict(steps=6, seed=5, height=64, width=64, progress=False)
    for sampler in (samplers.ddim, samplers.pndm):
        a = sample_latents(single, "a photo of rraj person", "blurry", sampler=sampler, **options)
        b = sample_latents(ours, "a photo of rraj person", "blurry", sampler=sampler, **options)
        assert torch.equal(a, b), sampler
        assert (pixels(decode(single, a)) == pixels(decode(ours, b))).all()


def test_lora_generation_matches_diffusers_load_lora_weights(folder, tmp_path):
    """A LoRA file applied by minidream (fused) gives diffusers' image with load_lora_weights."""
    throwaway = load_model(folder)
    file = write_random_lora(tmp_path / "subject.safetensors", throwaway.unet, throwaway.text.text_encoder,
                             throwaway.text.text_encoder_2)
    model = load_model(folder)
    plain = sample_latents(model, "a photo of rraj person", steps=5, progress=False)
    add_loras(model, [(file, 1.0)])
    pipe = reference(folder)
    pipe.load_lora_weights(str(file))
    kw = BASE | {"steps": 5}
    want = diffusers_run(pipe, "ddim", ["a photo of rraj person"], None, "latent", **kw)
    got = sample_latents(model, "a photo of rraj person", steps=5, progress=False)
    print(f"LoRA: latents rel err {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= LATENT_TOL
    assert rel_err(got, plain) > 1e-2  # the LoRA really changed the image


def test_fused_loras_equal_unfused(folder, tmp_path):
    files = []
    for seed in (3, 11):
        throwaway = load_model(folder)
        files.append(write_random_lora(tmp_path / f"lora{seed}.safetensors", throwaway.unet, seed=seed))
    loras = [(files[0], 1.0), (files[1], 0.6)]
    unfused, fused = load_model(folder), load_model(folder)
    add_loras(unfused, loras, fuse=False)
    add_loras(fused, loras)
    a = sample_latents(unfused, "a photo of rraj person", steps=4, progress=False)
    b = sample_latents(fused, "a photo of rraj person", steps=4, progress=False)
    assert rel_err(b, a) <= 1e-5


def test_fp16_keeps_the_sdxl_vae_in_fp32_unless_given_a_safe_one(folder, tmp_path):
    half = load_model(folder, dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert half.vae.decoder.conv_in.weight.dtype == torch.float32  # force_upcast: fp16 would overflow
    latents = sample_latents(half, "a photo of rraj person", steps=3, progress=False)
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert len(decode(half, latents)) == 1
    # An fp16-safe VAE (force_upcast false, like madebyollin/sdxl-vae-fp16-fix) given with --vae stays fp16.
    shutil.copytree(folder / "vae", tmp_path / "vae-fp16-fix")
    config = (tmp_path / "vae-fp16-fix" / "config.json").read_text().replace('"force_upcast": true', '"force_upcast": false')
    (tmp_path / "vae-fp16-fix" / "config.json").write_text(config)
    safe = load_model(folder, dtype=torch.float16, vae=tmp_path / "vae-fp16-fix")
    assert safe.vae.decoder.conv_in.weight.dtype == torch.float16


def test_generate_returns_prompt_major_images(ours):
    images = generate(ours, ["a dog", "a cup"], num_images=2, steps=2, progress=False)
    assert len(images) == 4 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    # One noise tensor for the whole batch: its first rows are the noise a batch of "a dog" alone gets.
    alone = generate(ours, ["a dog"], num_images=2, steps=2, progress=False)
    assert np.abs(pixels(alone) - pixels(images[:2])).max() <= 1
    assert np.abs(pixels(images[2:]) - pixels(images[:2])).max() > 10


def test_bad_arguments(ours):
    with pytest.raises(ValueError, match="multiples of 8"):
        check_size(100, 64)
    with pytest.raises(ValueError, match=f"multiples of {ours.vae_scale}"):  # the tiny VAE's factor is 4
        sample_latents(ours, "a dog", height=62, steps=2, progress=False)
    with pytest.raises(ValueError, match="eta is DDIM's noise"):
        sample_latents(ours, "a dog", sampler=samplers.pndm, eta=0.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="no prompt"):
        sample_latents(ours, [], steps=2, progress=False)
