"""The command lines of train.py and sample.py, and the checks of what was given that need no model.

train.py's flags are built from the fields of minidream.config.TrainConfig, where each setting is
documented once: the flag is --name-with-dashes (or the field's "flag"), the help is the field's
with its default shown as [default], the type comes from the annotation, booleans get --x and
--no-x, and config.HELP_SECTIONS cuts them into sections of --help. A flag left out is not set at all
(argparse.SUPPRESS), so TrainConfig's own defaults, and its presets, decide.

This module imports no torch: `--help` and mistyped flags answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path

from minidream.config import (BASE_WEIGHTS, EMBEDDING_FILE, HELP_SECTIONS, LORA_FILE, METHODS, PRECISIONS, PRESETS,
                              RESUME_OVERRIDES, TrainConfig, TrainingError)
from minidream.errors import UserError

ARGPARSE_TYPES = {"int": int, "float": float, "str": str, "list": str}  # a list's items are str unless "type" says
VAE_TILE = 512  # px: sample.py --vae-tiling alone (minidream.lowmem.tiled_vae.DEFAULT_TILE; no torch here)
EXTRA_FLAGS = {"generate_class_images": ("--generate",)}  # older spellings that keep working: --no-generate


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors: one line `prog: error: ...` and exit code 2."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")


# ---------------------------------------------------------------------------------------------
# train.py: one flag per TrainConfig field


def as_typed(value) -> str:
    """A default as a user would type it: on/off, a list space-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(as_typed, value))
    return "unset" if value is None else str(value)


def preset_note(name: str) -> str:
    """"preset: SDXL 1000, tiny 1500" from PRESETS, per method where the methods' presets differ."""
    methods = [method for method in METHODS if name in PRESETS["sdxl", method]]  # those it is for
    by_method = {method: f"SDXL {as_typed(PRESETS['sdxl', method][name])}, "
                         f"tiny {as_typed(PRESETS['tiny', method][name])}" for method in methods}
    if len(set(by_method.values())) == 1 and methods == list(METHODS):
        return f"preset: {by_method[METHODS[0]]}"
    return "preset: " + "; ".join(f"{method} {values}" for method, values in by_method.items())


def field_help(f: Field) -> str:
    """The field's help, "[preset]" spelled out from PRESETS, its default (where not None) appended."""
    text = f.metadata["help"]
    if "[preset]" in text:
        text = text.replace("[preset]", f"[{preset_note(f.name)}]")
    default = f.default_factory() if f.default is MISSING else f.default
    if default is not None:
        text += f" [{as_typed(default)}]"
    return text.replace("%", "%%")  # argparse formats help with %


def field_argument(f: Field) -> tuple[list[str], dict]:
    """(flags, add_argument keywords) of one TrainConfig field."""
    meta = f.metadata
    flags = [meta.get("flag", "--" + f.name.replace("_", "-")), *EXTRA_FLAGS.get(f.name, ())]
    options = dict(dest=f.name, help=field_help(f))
    options |= {key: meta[key] for key in ("choices", "metavar", "action", "nargs", "type") if key in meta}
    annotation = str(f.type).split("|")[0].strip()  # "int | None" -> "int" (annotations are strings here)
    if annotation == "bool":
        options.setdefault("action", argparse.BooleanOptionalAction)
    else:
        options.setdefault("type", ARGPARSE_TYPES[annotation])
    return flags, options


def train_parser(description: str) -> Parser:
    """train.py's parser: one flag per TrainConfig field, one --help section per field group."""
    parser = Parser(prog="train.py", description=description, argument_default=argparse.SUPPRESS,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        if f.name in HELP_SECTIONS:
            section = parser.add_argument_group(HELP_SECTIONS[f.name])
        flags, options = field_argument(f)
        section.add_argument(*flags, **options)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed train.py arguments; names that are no setting (--plan) are left out."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in vars(args).items() if name in names})


def run_folder(path: str) -> Path:
    """The real folder behind `path` to a run: through a symlink (runs/raj-latest), a relative path or a
    trailing slash, resolved once, so nothing later mistakes the link for the run."""
    given = Path(path)
    try:
        run = given.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a broken link, a loop (RuntimeError before Python 3.13)
        why = "a broken or looping link" if given.is_symlink() else "nothing there"
        runs = sorted(c.parent for c in given.parent.glob("*/config.json") if not c.parent.is_symlink())
        listed = ", ".join(str(r) for r in runs[-5:]) or "none"
        raise TrainingError(f"--resume {path} is not a run folder ({why}); run folders there: {listed}") from None
    if not (run / "config.json").is_file():
        raise TrainingError(f"{path} is not a run folder (no config.json): give a folder made by train.py")
    return run


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The saved config of run cfg.resume, with the few settings that may change on resume."""
    run = run_folder(cfg.resume)
    names = {f.name for f in fields(TrainConfig)}
    try:
        saved = TrainConfig(**{k: v for k, v in json.loads((run / "config.json").read_text()).items() if k in names})
    except (ValueError, AttributeError, RecursionError) as e:  # not UTF-8, not JSON, not an object
        raise TrainingError(f"{run / 'config.json'} is damaged ({str(e)[:80]}); restore it, or start a new run") from None
    default = TrainConfig()
    for name in names - {"resume"}:
        given = getattr(cfg, name)
        if given != getattr(default, name) and given != getattr(saved, name):
            if name in RESUME_OVERRIDES:
                setattr(saved, name, given)
            else:
                print(f"note: --{name.replace('_', '-')} ignored on resume; the run keeps {getattr(saved, name)!r}")
    saved.resume = str(run)
    return saved


# ---------------------------------------------------------------------------------------------
# sample.py

SAMPLE_EPILOG = """\
Without --model: weights/sdxl-base-1.0 (or weights/sd_xl_base_1.0.safetensors) once downloaded
(README: 'Real SDXL on a GPU'), else the bundled tiny model weights/tiny-sdxl, which runs on a CPU
in seconds (pretrained on minidream's toy world: 64 px toy pictures from toy prompts).
Bad input ends in one line 'sample.py: error: ...' and exit code 2."""


def sample_parser(description: str) -> Parser:
    """sample.py's parser."""
    p = Parser(prog="sample.py", description=description, epilog=SAMPLE_EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                      help="a prompt; repeat for several (each gets --num-images images)")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="UTF-8 text file, one prompt per line (blank lines and # comments skipped)")
    what.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from [none: SDXL's zero embedding]")
    what.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt [%(default)s]")
    what.add_argument("--seed", type=int, default=0, help="seed of prompt 1; prompt k uses seed + k - 1 [%(default)s]")
    what.add_argument("--height", type=int, metavar="PX", help="image height, a multiple of 8 [the model's: SDXL 1024]")
    what.add_argument("--width", type=int, metavar="PX", help="image width, a multiple of 8 [the model's]")

    how = p.add_argument_group("sampling")
    how.add_argument("--sampler", metavar="NAME", default="ddim",  # checked against cli.sample_command.SAMPLERS
                     help="ddim (Song et al. 2021), pndm (PLMS, Liu et al. 2022), euler (Karras et al. 2022), "
                          "dpmpp-2m (DPM-Solver++(2M), Lu et al. 2022: good images in fewer steps) or "
                          "dpmpp-2m-karras (the same on Karras et al.'s sigmas) [%(default)s]")
    how.add_argument("--scheduler", dest="sampler", help=argparse.SUPPRESS)  # the flag's earlier name
    how.add_argument("--steps", type=int, default=30, help="sampling steps [%(default)s]")
    how.add_argument("--guidance", type=float, default=5.0,
                     help="classifier-free guidance scale; <= 1 turns it off [%(default)s]")
    how.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 (deterministic) to 1 [%(default)s]")
    how.add_argument("--karras", action="store_true",
                     help="dpmpp-2m on Karras et al.'s sigma schedule (denser near the end), as "
                          "--sampler dpmpp-2m-karras [off]")

    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="PATH", help="diffusers SDXL folder or single .safetensors file")
    model.add_argument("--vae", metavar="PATH", help="another VAE (folder or file), e.g. madebyollin/sdxl-vae-fp16-fix: "
                                                     "decodes in fp16 where SDXL's own VAE must run in fp32")
    model.add_argument("--tokenizer", metavar="DIR",
                       help="folder with tokenizer/ and tokenizer_2/ (single files carry no tokenizer)")
    model.add_argument("--variant", choices=["fp16"], help="read a folder's *.fp16.safetensors files")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA adapter (or a training run folder: its LoRA, and the new word of a --method "
                            "pivotal run) and its strength [1.0]; repeat to combine several, e.g. "
                            "--lora runs/raj-latest --lora style.safetensors:0.8")
    model.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                       help="a textual-inversion embedding (.safetensors, e.g. train.py --method textual-inversion's "
                            "learned_embeds.safetensors); prompts name it by TOKEN [the token stored in the file, "
                            "else the file name], e.g. '<rraj>'; repeatable")
    model.add_argument("--device", help="cpu, cuda, cuda:1, mps ... [cuda if available, else cpu]")
    model.add_argument("--base-weights", choices=BASE_WEIGHTS, default="fp16",
                       help="the UNet's Linear weights: fp16 = --dtype, or int8/nf4 quantised [%(default)s]")
    model.add_argument("--dtype", choices=PRECISIONS, help="weights dtype [fp16 on cuda, fp32 elsewhere]")
    model.add_argument("--vae-tiling", type=int, nargs="?", const=VAE_TILE, metavar="PX",
                       help=f"decode in overlapping PX-pixel tiles, one image at a time: the VAE's GPU memory of a "
                            f"tile, not of the image (faint seams possible; 256 for 6 GB cards) [off; {VAE_TILE}]")
    model.add_argument("--cpu-threads", type=int, metavar="N",
                       help="torch CPU threads [1 for the tiny model (fastest), torch's default for SDXL]")

    morph = p.add_argument_group("morph animation (a loop through N seeds' starting noise, spherical interpolation)")
    morph.add_argument("--morph", type=int, metavar="N", help="keyframes: seeds --seed .. --seed + N - 1, with one "
                       "prompt, or N prompts (one per keyframe, their embeddings interpolated too)")
    morph.add_argument("--frames", type=int, default=24, help="frames in the whole loop [%(default)s]")
    morph.add_argument("--fps", type=float, default=8.0, help="frames per second [%(default)s]")
    morph.add_argument("--animation", choices=("gif", "webp"), default="gif",
                       help="file format of OUT/morph.FORMAT [%(default)s]")

    p.add_argument("--out", default="runs/samples", metavar="DIR",
                   help="each call writes into a new folder OUT/<date>-<time>-<prompt> [%(default)s]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclass
class SampleRequest:
    """What sample.py was asked for, checked as far as it can be without a model."""

    prompts: list[str]
    loras: list[tuple[Path, float]]  # (file, strength)
    embeddings: list[tuple[Path, str | None]]  # (file, the word prompts call it; None: the file's own)


def parse_lora(spec: str) -> tuple[Path, float]:
    """"FILE[:SCALE]" -> (path, scale). A colon followed by something that is no number belongs to
    the path (C:\\loras\\x.safetensors)."""
    path, _, scale = spec.rpartition(":")
    if not path:
        return Path(spec), 1.0
    try:
        value = float(scale)
    except ValueError:  # no number after the colon: the colon is part of the path
        return Path(spec), 1.0
    if not math.isfinite(value) or abs(value) > 100:
        raise UserError(f"--lora {spec}: the scale must be a number between -100 and 100 (e.g. {path}:0.8)")
    return Path(path), value


def parse_embedding(spec: str) -> tuple[Path, str | None]:
    """"FILE[:TOKEN]" -> (path, token or None); a colon inside a path (C:\\x) stays in the path."""
    path, _, token = spec.rpartition(":")
    if path and path.endswith(".safetensors") and token and "/" not in token and "\\" not in token:
        return Path(path), token
    return Path(spec), None


def read_prompts_file(path: str) -> list[str]:
    """The prompts of a UTF-8 file, one a line; blank lines and # comments are skipped."""
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


def check_numbers(args: argparse.Namespace) -> None:
    """Image size, steps, images per prompt and DDIM's eta."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{name} {value} is not a positive multiple of 8 (the VAE's downsampling "
                            f"factor); use e.g. --{name} {max(8, value // 8 * 8)}")
    for name, most in (("height", 16384), ("width", 16384), ("steps", 1000), ("num_images", 1024),
                       ("cpu_threads", 4096)):  # steps: at most the schedule's 1,000 training timesteps
        value = getattr(args, name)
        if value is not None and not 1 <= value <= most:
            raise UserError(f"--{name.replace('_', '-')} must be between 1 and {most:,}, got {value}")
    if args.vae_tiling is not None and (args.vae_tiling <= 0 or args.vae_tiling % 32):
        raise UserError(f"--vae-tiling {args.vae_tiling} is not a positive multiple of 32 (4 x the VAE's factor "
                        f"8: tiles overlap by a quarter); use e.g. --vae-tiling {VAE_TILE}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {args.eta}")
    if args.eta and args.sampler != "ddim":
        raise UserError(f"--eta is DDIM's noise; use --sampler ddim or drop --eta ({args.sampler} has none)")
    if args.karras and args.sampler != "dpmpp-2m":
        raise UserError("--karras (Karras et al.'s sigmas) is for dpmpp-2m; use --sampler dpmpp-2m or drop --karras")


def check_morph(args: argparse.Namespace, prompts: list[str]) -> None:
    """--morph N: keyframes, frames and prompts that make a loop."""
    if args.morph is None:
        return
    if args.morph < 2:
        raise UserError(f"--morph {args.morph}: a morph needs at least 2 keyframes (seeds)")
    if args.frames < args.morph:
        raise UserError(f"--frames {args.frames} is fewer than the {args.morph} keyframes; "
                        f"give --frames {4 * args.morph} or more")
    if args.fps <= 0:
        raise UserError(f"--fps must be positive, got {args.fps}")
    if len(prompts) not in (1, args.morph):
        raise UserError(f"--morph {args.morph} takes one prompt or {args.morph} (one per keyframe), got {len(prompts)}")
    if args.num_images != 1 or args.eta:
        raise UserError("--morph makes one image per frame from its own noise: drop --num-images and --eta")


def result_file(path: Path, name: str, flag: str, example: str) -> Path:
    """The file a --lora / --embedding names: the file itself, or a training run folder's result inside it."""
    if path.is_dir():
        if (path / name).is_file():
            return path / name
        unfinished = " (the run has not finished: continue it with train.py --resume)" if (
            path / "config.json").is_file() else ""
        raise UserError(f"{flag} {path} is a folder without {name}{unfinished}; give {flag} {example}")
    if not path.is_file():
        raise UserError(f"{flag} {path} not found; give {flag} {example}, or a training run folder")
    return path


def check_paths(args: argparse.Namespace, loras, embeddings) -> tuple[list, list]:
    """Every file or folder given exists (what they hold is checked when they are read); run folders given as
    --lora / --embedding are replaced by their result files. A --lora run folder holding a word as well
    (train.py --method pivotal) gives its embedding too, as if --embedding RUN/learned_embeds.safetensors."""
    words = [p / EMBEDDING_FILE for p, _ in loras if p.is_dir() and (p / EMBEDDING_FILE).is_file()]
    loras = [(result_file(p, LORA_FILE, "--lora", "FILE.safetensors[:SCALE]"), s) for p, s in loras]
    embeddings = [(result_file(p, EMBEDDING_FILE, "--embedding", "FILE.safetensors[:TOKEN]"), t) for p, t in embeddings]
    given = {p.resolve() for p, _ in embeddings}  # a word given both ways is loaded once
    embeddings += [(p, None) for p in words if p.resolve() not in given]
    if args.vae and not Path(args.vae).exists():
        raise UserError(f"--vae {args.vae} does not exist; give a VAE folder or .safetensors file")
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise UserError(f"--tokenizer {args.tokenizer} is not a folder; give one holding tokenizer/ and tokenizer_2/")
    if args.model and not Path(args.model).exists():
        raise UserError(f"--model {args.model} does not exist; give a diffusers SDXL folder or a .safetensors "
                        "file (README: 'Real SDXL on a GPU'), or leave --model out for the bundled tiny model")
    return loras, embeddings


def check_sample_args(args: argparse.Namespace) -> SampleRequest:
    """Every check of sample.py's arguments that needs no model, cheapest first."""
    prompts = [p for p in args.prompt if p.strip()] + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError('no prompt: give --prompt "a photo of ..." (repeatable) or --prompts-file FILE')
    check_numbers(args)
    check_morph(args, prompts)
    loras = [parse_lora(spec) for spec in args.lora]
    embeddings = [parse_embedding(spec) for spec in args.embedding]
    loras, embeddings = check_paths(args, loras, embeddings)
    return SampleRequest(prompts, loras, embeddings)
