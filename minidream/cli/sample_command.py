"""sample.py's work once its arguments are checked (cli.args.check_sample_args): choose the device and
the model, read the LoRA and embedding files, load, generate, and write the PNGs (each with its
settings in the PNG's text metadata) and a contact sheet, or a morph animation.

Every file the user gave is read before the model loads (minutes for SDXL), so a bad one fails at once.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidream import __version__
from minidream.cli.args import SampleRequest
from minidream.cli.morph import write_morph
from minidream.config import default_cpu_threads, slug
from minidream.errors import UserError
from minidream.files import save_png
from minidream.formats.lora_files import add_loras, read_lora
from minidream.methods.textual_inversion import expand_prompt, load_embedding, read_embedding
from minidream.formats import default_model_path, detect, load_model, model_image_size
from minidream.lowmem.tiled_vae import use_tiled_vae
from minidream.model import Model
from minidream.optim import DTYPES
from minidream import more_samplers
from minidream.pipeline import generate
from minidream.drawing import labelled_grid
from minidream.runs import new_folder

SAMPLERS = more_samplers.SAMPLERS  # sample.py --sampler NAME; --karras: dpmpp-2m-karras


def sample_images(args: argparse.Namespace, request: SampleRequest) -> None:
    """sample.py after parsing: check what needs the library, load, generate, write, list the files."""
    if args.sampler not in SAMPLERS:
        raise UserError(f"argument --sampler: invalid choice: {args.sampler!r} (choose from {', '.join(SAMPLERS)})")
    read_user_files(request)
    device = choose_device(args.device)
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    model_path, why = choose_model(args.model)
    threads = set_cpu_threads(args.cpu_threads, model_path) if device == "cpu" else None
    out = make_output_folder(args.out, request.prompts[0])
    print(f"model: {relative(model_path)}: {why} [{device}{f', {threads} thread(s)' if threads else ''}, {dtype}]",
          flush=True)
    start = time.time()
    model, prompts = load(args, request, model_path, dtype, device)
    print(f"loaded in {time.time() - start:.1f} s"
          + (f" with {len(request.loras)} LoRA(s) {'fused' if args.base_weights == 'fp16' else 'unmerged'}"
             if request.loras else ""))
    start = time.time()
    metadata = settings_metadata(args, request, model, dtype)
    if args.morph:
        seeds = [args.seed + i for i in range(args.morph)]
        files = write_morph(model, prompts, seeds, out, args.frames, args.fps, args.animation, metadata,
                            **sampling_options(args, model))
    else:
        files = write_images(args, model, prompts, out, metadata)
    what = "an animation" if args.morph else "a grid"
    print(f"wrote {len(files) - 1} image(s) and {what} in {time.time() - start:.1f} s to {relative(out)}/:")
    for name in files[:3] + (["..."] if len(files) > 6 else []) + files[max(3, len(files) - 3):]:
        print(f"  {getattr(name, 'name', name)}")


# ---------------------------------------------------------------------------------------------
# Before loading


def read_user_files(request: SampleRequest) -> None:
    """Read every LoRA and embedding file once: readable, and in a known layout."""
    for path, _ in request.loras:
        read_lora(path)
    for path, token in request.embeddings:
        read_embedding(path, token)


def choose_device(requested: str | None) -> str:
    """--device, or cuda where there is one, else cpu."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch has no CUDA device; use --device cpu")
    return device


def choose_model(given: str | None) -> tuple[Path, str]:
    """(model path, why it was chosen): --model, else SDXL under weights/, else the bundled tiny model."""
    if given:
        path, why = Path(given), "given with --model"
    else:
        path, why = default_model_path()
        if not path.exists():
            raise UserError(f"the bundled tiny model {path} is missing; regenerate it with "
                            "`python -m minidream.toy.tiny weights/tiny-sdxl`, or give --model")
    info = detect(path)
    if info.layout not in ("diffusers", "single-file"):
        raise UserError(f"{path} is {info.description}. --model needs a diffusers SDXL folder "
                        "(with model_index.json) or a single-file .safetensors checkpoint")
    return path, why


def set_cpu_threads(requested: int | None, model_path: Path) -> int | None:
    """--cpu-threads, else the thread policy train.py uses too (config.default_cpu_threads)."""
    threads = requested or default_cpu_threads(model_image_size(model_path))
    if threads:
        torch.set_num_threads(threads)
    return threads


def make_output_folder(out: str, first_prompt: str) -> Path:
    """A new folder OUT/<date>-<time>-<first prompt> for this call, made now, before minutes of loading.
    Made with mkdir (never an existing folder), so no call writes over another's images."""
    for folder in (Path(out), *Path(out).parents):
        if folder.is_file():
            raise UserError(f"--out {out}: {folder} is a file: give a folder")
    return new_folder(Path(out) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(first_prompt, 'image')[:40]}")


# ---------------------------------------------------------------------------------------------
# Loading and generating


def load(args: argparse.Namespace, request: SampleRequest, path: Path, dtype: str, device: str
         ) -> tuple[Model, list[str]]:
    """The model with its LoRAs fused in and its embeddings' words added, and the prompts with each
    multi-vector word spelled out as the tokenizer now knows it (see expand_prompt)."""
    model = load_model(path, DTYPES[dtype], device, vae=args.vae, tokenizer=args.tokenizer, variant=args.variant,
                       base_weights=args.base_weights)
    if args.vae_tiling:
        use_tiled_vae(model, args.vae_tiling)
    add_loras(model, request.loras)
    prompts = request.prompts
    for file, token in request.embeddings:
        token, vectors = load_embedding(model.text, file, token)
        prompts = [expand_prompt(p, token, vectors) for p in prompts]
    return model, prompts


def sampling_options(args: argparse.Namespace, model: Model) -> dict:
    """The keywords of minidream.pipeline.sample_latents that images and morph frames share."""
    sampler = SAMPLERS[args.sampler + ("-karras" if args.karras else "")]
    return dict(negative_prompt=args.negative_prompt, sampler=sampler, steps=args.steps,
                guidance_scale=args.guidance, height=args.height or model.default_size,
                width=args.width or model.default_size, progress=not args.no_progress)


def settings_metadata(args: argparse.Namespace, request: SampleRequest, model: Model, dtype: str) -> dict[str, str]:
    """The settings every written PNG carries in its text metadata."""
    height, width = args.height or model.default_size, args.width or model.default_size
    return {
        "negative_prompt": args.negative_prompt or "",
        "sampler": args.sampler + (" --karras" if args.karras else ""), "steps": str(args.steps),
        "guidance": str(args.guidance), "eta": str(args.eta), "size": f"{width}x{height}",
        "model": model.name, "vae": args.vae or "", "tokenizer": args.tokenizer or "", "variant": args.variant or "",
        "vae_tiling": str(args.vae_tiling or ""), "dtype": dtype, "base_weights": args.base_weights,
        "device": args.device or "", "loras": ", ".join(f"{p}:{scale:g}" for p, scale in request.loras),
        "embeddings": ", ".join(f"{p}:{token}" if token else str(p) for p, token in request.embeddings),
        "minidream": __version__,
    }


def write_images(args: argparse.Namespace, model: Model, prompts: list[str], out: Path, metadata: dict) -> list[Path]:
    """--num-images PNGs per prompt (prompt k draws with seed + k), then grid.png: a row per prompt."""
    options = sampling_options(args, model)
    negative_prompt = options.pop("negative_prompt")
    written, images = [], []
    for k, prompt in enumerate(tqdm(prompts, desc="prompts", disable=args.no_progress or len(prompts) == 1)):
        seed = args.seed + k
        batch = generate(model, [prompt], negative_prompt, seed=seed, eta=args.eta, num_images=args.num_images,
                         **options)
        for i, image in enumerate(batch):
            meta = {"prompt": prompt, "seed": str(seed), "image": f"{i + 1} of {len(batch)}", **metadata}
            name = f"{len(written):03d}-{slug(prompt, 'image')}-seed{seed}-{i + 1}.png"
            written.append(save_png(out / name, image, meta))
        images += batch
    labels = [f"{prompt} (seed {args.seed + k})" for k, prompt in enumerate(prompts)]
    columns = [f"image {i + 1}" for i in range(args.num_images)] if args.num_images > 1 else None
    grid = save_png(out / "grid.png", labelled_grid(images, labels, columns),
                    {"prompts": "\n".join(prompts), "seed": str(args.seed), **metadata})
    return written + [grid]


def relative(path: Path) -> str:
    """`path` relative to the current folder when it is inside it (shorter messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:  # not inside the current folder
        return str(path)
