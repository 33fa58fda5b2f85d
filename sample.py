"""Generate images with an SDXL model (and LoRAs): a thin command line over minidream.pipeline.

    python sample.py --prompt "a photo of rraj person"                  # bundled tiny model, CPU
    python sample.py --model weights/sdxl-base-1.0 --prompt "a photo of rraj person" \\
        --lora runs/raj/lora.safetensors --lora pixel-art.safetensors:0.8 --num-images 4
    python sample.py --embedding runs/raj/learned_embeds.safetensors --prompt "a photo of <rraj> person"
    python sample.py --prompt "a photo of rraj person" --morph 4 --frames 48 --fps 12   # looping morph.gif

Error policy: everything the user gives (arguments, prompt files, model, VAE, tokenizer, LoRA files)
is checked and loaded before the first sampling step. A problem there is a user error: one line
`sample.py: error: ...` that names the fix, exit code 2, no traceback (argparse's own errors too).
What fails after that is a bug or the machine: out of memory gets a one-line hint and exit code 1;
anything else keeps its traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCHEDULERS = ("ddim", "pndm", "euler")  # minidream.pipeline.SAMPLERS, without importing torch for --help
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error; --help has the rest
        raise UserError(f"{message} (see python sample.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="sample.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images from text with an SDXL model (a diffusers folder or a single .safetensors\n"
                    "file), optionally with LoRA adapters. Writes one PNG per image, its settings in the PNG's text\n"
                    "metadata, plus a contact sheet grid.png. The same seed, prompt and settings give the same image\n"
                    "as diffusers' StableDiffusionXLPipeline.",
        epilog="Without --model: weights/sdxl-base-1.0 (or weights/sd_xl_base_1.0.safetensors) once downloaded\n"
               "(README: 'Real SDXL on a T4'), else the bundled tiny model weights/tiny-sdxl, which runs on a CPU\n"
               "in seconds (pretrained on minidream's toy world: 64 px toy pictures from toy prompts).\n"
               "Bad input ends in one line 'sample.py: error: ...' and exit code 2.",
    )
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                      help="a prompt; repeat for several (each gets --num-images images)")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="UTF-8 text file, one prompt per line (blank lines and # comments skipped)")
    what.add_argument("--negative-prompt", metavar="TEXT",
                      help="what to steer away from (default: none, SDXL's zero embedding)")
    what.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    what.add_argument("--seed", type=int, default=0,
                      help="seed of prompt 1; prompt k uses seed + k - 1 (default: 0)")
    what.add_argument("--height", type=int, metavar="PX", help="image height, a multiple of 8 (default: the model's, SDXL 1024)")
    what.add_argument("--width", type=int, metavar="PX", help="image width, a multiple of 8 (default: the model's)")

    how = p.add_argument_group("sampling")
    how.add_argument("--scheduler", choices=SCHEDULERS, default="ddim",
                     help="ddim (Song et al. 2021), pndm (PLMS, Liu et al. 2022) or euler (Karras et al. 2022); default: ddim")
    how.add_argument("--steps", type=int, default=30, help="sampling steps (default: 30)")
    how.add_argument("--guidance", type=float, default=5.0,
                     help="classifier-free guidance scale; <= 1 turns it off (default: 5.0)")
    how.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 (deterministic) to 1 (default: 0)")

    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="PATH", help="diffusers SDXL folder or single .safetensors file")
    model.add_argument("--vae", metavar="PATH",
                       help="another VAE (folder or file), e.g. madebyollin/sdxl-vae-fp16-fix: decodes in fp16 "
                            "where SDXL's own VAE must run in fp32")
    model.add_argument("--tokenizer", metavar="DIR",
                       help="folder with tokenizer/ and tokenizer_2/ (single files carry no tokenizer)")
    model.add_argument("--variant", choices=["fp16"], help="read a folder's *.fp16.safetensors files")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA adapter and its strength (default 1.0); repeat to combine several, "
                            "e.g. --lora subject.safetensors --lora style.safetensors:0.8")
    model.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                       help="a textual-inversion embedding (.safetensors, e.g. train.py --method textual-inversion's "
                            "learned_embeds.safetensors); prompts name it by TOKEN (default: the token stored in the "
                            "file, else the file name), e.g. '<rraj>'; repeatable")
    model.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: fp16 on cuda, fp32 elsewhere)")

    morph = p.add_argument_group("morph animation (a loop through N seeds' starting noise, spherical interpolation)")
    morph.add_argument("--morph", type=int, metavar="N", help="keyframes: seeds --seed .. --seed + N - 1, with one "
                       "prompt, or N prompts (one per keyframe, their embeddings interpolated too)")
    morph.add_argument("--frames", type=int, default=24, help="frames in the whole loop (default: %(default)s)")
    morph.add_argument("--fps", type=float, default=8.0, help="frames per second (default: %(default)s)")
    morph.add_argument("--animation", choices=("gif", "webp"), default="gif",
                       help="file format of OUT/morph.FORMAT (default: %(default)s)")

    p.add_argument("--out", default="runs/samples", metavar="DIR", help="where the PNGs go (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------------------------
# Checking what the user gave (before anything slow happens)


@dataclass
class Request:
    prompts: list[str]
    loras: list[tuple[Path, float]]
    embeddings: list[tuple[Path, str | None]]
    model: Path
    model_note: str
    device: str
    dtype: str


def parse_lora(spec: str) -> tuple[Path, float]:
    """"FILE[:SCALE]" -> (path, scale). A colon followed by something that is no number belongs to
    the path (C:\\loras\\x.safetensors)."""
    path, _, scale = spec.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(spec), 1.0)
    except ValueError:
        return Path(spec), 1.0


def parse_embedding(spec: str) -> tuple[Path, str | None]:
    """"FILE[:TOKEN]" -> (path, token or None); a colon inside a path (C:\\x) stays in the path."""
    path, _, token = spec.rpartition(":")
    if path and path.endswith(".safetensors") and token and "/" not in token and "\\" not in token:
        return Path(path), token
    return Path(spec), None


def check_morph(args, prompts: list[str]) -> None:
    if args.morph is None:
        return
    if args.morph < 2:
        raise UserError(f"--morph {args.morph}: a morph needs at least 2 keyframes (seeds)")
    if args.frames < args.morph:
        raise UserError(f"--frames {args.frames} is fewer than the {args.morph} keyframes; give --frames {4 * args.morph} or more")
    if args.fps <= 0:
        raise UserError(f"--fps must be positive, got {args.fps}")
    if len(prompts) not in (1, args.morph):
        raise UserError(f"--morph {args.morph} takes one prompt or {args.morph} (one per keyframe), got {len(prompts)}")
    if args.num_images != 1 or args.eta:
        raise UserError("--morph makes one image per frame from its own noise: drop --num-images and --eta")


def read_prompts_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise UserError(f"cannot read the prompts file {path} ({reason}); give a UTF-8 text file "
                        "with one prompt per line") from e
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"the prompts file {path} holds no prompts; write one prompt per line")
    return prompts


def check(args) -> Request:
    """Every check that needs no model, cheapest first (the slow imports come last)."""
    prompts = [p for p in args.prompt if p.strip()] + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError('no prompt: give --prompt "a photo of ..." (repeatable) or --prompts-file FILE')
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{name} {value} is not a positive multiple of 8 (the VAE's downsampling "
                            f"factor); use e.g. --{name} {max(8, value // 8 * 8)}")
    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {args.eta}")
    if args.eta and args.scheduler != "ddim":
        raise UserError(f"--eta is DDIM's noise; use --scheduler ddim or drop --eta ({args.scheduler} has none)")
    check_morph(args, prompts)
    loras = [parse_lora(spec) for spec in args.lora]
    for path, _ in loras:
        if not path.is_file():
            raise UserError(f"LoRA file {path} not found; give --lora FILE.safetensors[:SCALE]")
    embeddings = [parse_embedding(spec) for spec in args.embedding]
    for path, _ in embeddings:
        if not path.is_file():
            raise UserError(f"embedding file {path} not found; give --embedding FILE.safetensors[:TOKEN]")
    if args.vae and not Path(args.vae).exists():
        raise UserError(f"--vae {args.vae} does not exist; give a VAE folder or .safetensors file")
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise UserError(f"--tokenizer {args.tokenizer} is not a folder; give one holding tokenizer/ and tokenizer_2/")
    if args.model and not Path(args.model).exists():
        raise UserError(f"--model {args.model} does not exist; give a diffusers SDXL folder or a .safetensors "
                        "file (README: 'Real SDXL on a T4'), or leave --model out for the bundled tiny model")

    import torch

    from minidream.checkpoint import detect
    from minidream.lora_files import read_lora

    for path, _ in loras:  # readable and in a known layout, before minutes of model loading
        read_lora(path)
    if embeddings:
        from minidream.textual_inversion import read_embedding

        for path, token in embeddings:
            read_embedding(path, token)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch has no CUDA device; use --device cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    if args.model:
        model, note = Path(args.model), "given with --model"
    else:
        from minidream.model import default_model_path

        model, note = default_model_path()
        if not model.exists():
            raise UserError(f"the bundled tiny model {model} is missing; regenerate it with "
                            "`python -m minidream.tiny weights/tiny-sdxl`, or give --model")
    info = detect(model)
    if info.layout not in ("diffusers", "single-file"):
        raise UserError(f"{model} is {info.description}. --model needs a diffusers SDXL folder "
                        "(with model_index.json) or a single-file .safetensors checkpoint")
    return Request(prompts, loras, embeddings, model, note, device, dtype)


def load(args, req: Request):
    """The model with its LoRAs fused in and its embeddings' words added; minidream's loaders raise
    ValueError / OSError subclasses (CheckpointError, LoRAMismatchError, EmbeddingFileError, ...)
    with messages naming the fix. A multi-vector word is spelled out in the prompts (req.prompts)."""
    import torch

    from minidream.model import add_loras, load_model
    from minidream.textual_inversion import expand_prompt, load_embedding

    dtype = getattr(torch, DTYPES[req.dtype])
    model = load_model(req.model, dtype, req.device, vae=args.vae, tokenizer=args.tokenizer, variant=args.variant)
    add_loras(model, req.loras)
    for path, token in req.embeddings:
        token, n = load_embedding(model.text, path, token)
        req.prompts = [expand_prompt(p, token, n) for p in req.prompts]
    return model


# ---------------------------------------------------------------------------------------------
# Generating and writing


def shown(path: Path) -> str:
    """`path` relative to the current folder when it is inside it (shorter messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "image"


def run(args, req: Request, model) -> list[Path]:
    from tqdm.auto import tqdm

    from minidream import __version__
    from minidream.files import image_grid, save_png
    from minidream.pipeline import generate

    out = Path(args.out)
    height, width = args.height or model.default_size, args.width or model.default_size
    settings = dict(sampler=args.scheduler, steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                    height=height, width=width, num_images=args.num_images, progress=not args.no_progress)
    common = {
        "negative_prompt": args.negative_prompt or "", "sampler": args.scheduler, "steps": str(args.steps),
        "guidance": str(args.guidance), "eta": str(args.eta), "size": f"{width}x{height}",
        "model": str(req.model), "vae": args.vae or "", "dtype": req.dtype,
        "loras": ", ".join(f"{p}:{s:g}" for p, s in req.loras), "minidream": __version__,
    }
    written, images = [], []
    for k, prompt in enumerate(tqdm(req.prompts, desc="prompts", disable=args.no_progress or len(req.prompts) == 1)):
        seed = args.seed + k
        batch = generate(model, [prompt], args.negative_prompt, seed=seed, **settings)
        for i, image in enumerate(batch):
            meta = {"prompt": prompt, "seed": str(seed), "image": f"{i + 1} of {len(batch)}", **common}
            written.append(save_png(out / f"{len(written):03d}-{slug(prompt)}-seed{seed}-{i + 1}.png", image, meta))
        images += batch
    grid = save_png(out / "grid.png", image_grid(images), {"prompts": "\n".join(req.prompts), **common})
    return written + [grid]


def run_morph(args, req: Request, model) -> list[Path]:
    """Frames (PNG) and the looping animation of `--morph N` keyframes."""
    from minidream import __version__
    from minidream.files import save_png
    from minidream.morph import render_morph, save_animation

    out = Path(args.out)
    seeds = [args.seed + i for i in range(args.morph)]
    frames = render_morph(model, req.prompts, seeds, args.frames, negative_prompt=args.negative_prompt,
                          height=args.height, width=args.width, sampler=args.scheduler, steps=args.steps,
                          guidance_scale=args.guidance, progress=not args.no_progress)
    meta = {"prompts": "\n".join(req.prompts), "seeds": " ".join(map(str, seeds)), "frames": str(args.frames),
            "model": str(req.model), "minidream": __version__}
    written = [save_png(out / "morph" / f"frame-{k:04d}.png", f, meta | {"frame": str(k)}) for k, f in enumerate(frames)]
    return written + [save_animation(out / f"morph.{args.animation}", frames, args.fps)]


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        req = check(args)
        print(f"model: {shown(req.model)}: {req.model_note} [{req.device}, {req.dtype}]", flush=True)
        t0 = time.time()
        model = load(args, req)
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except (UserError, ValueError, OSError) as e:  # ValueError / OSError: CheckpointError, LoRAMismatchError, ...
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    print(f"loaded in {time.time() - t0:.1f} s" + (f" with {len(req.loras)} LoRA(s) fused" if req.loras else ""))
    try:
        t0 = time.time()
        files = run_morph(args, req, model) if args.morph else run(args, req, model)
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print("sample.py: error: out of memory; use --dtype fp16, a smaller --height/--width or --num-images 1",
              file=sys.stderr)
        return 1
    what = "an animation" if args.morph else "a grid"
    print(f"wrote {len(files) - 1} image(s) and {what} in {time.time() - t0:.1f} s to {shown(Path(args.out))}/:")
    for f in files[:3] + (["..."] if len(files) > 6 else []) + files[max(3, len(files) - 3):]:
        print(f"  {getattr(f, 'name', f)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\nsample.py: interrupted", file=sys.stderr)
        sys.exit(130)
