"""Evaluate DreamBooth LoRAs as the paper does, and compare prior preservation on / off across samplers and steps.

    python -m minidream.eval.evaluate runs/raj-20250101-120000               # a training run folder
    python -m minidream.eval.evaluate --lora raj.safetensors --subject data/raj
    python -m minidream.eval.evaluate --prior RUN_OR_LORA --no-prior RUN_OR_LORA   # the 8-row table
    python -m minidream.eval.evaluate --train-pair --subject data/raj       # train both first (see train_pair)

For each LoRA and each (sampler, steps): the 25 DreamBooth prompts (eval_prompts.py) x 4 fixed
seeds, plus samples of the class prompt for PRES, are generated and scored against the subject's
photos (metrics.py). Written to the output folder (atomically, see minidream/files.py):

    <out>/[<label>/]<sampler>-<steps>/images/p00-s0.png ...  samples (PNG text: prompt, seed, settings)
    <out>/[<label>/]<sampler>-<steps>/class/s0.png ...       class-prompt samples
    <out>/[<label>/]<sampler>-<steps>/grid.png, class_grid.png, metrics.json
    <out>/metrics.md, metrics.json                            the table, one row per LoRA x sampler x steps

(<label>/ = prior/ and no-prior/ in the experiment.)

Image j of every prompt starts from the noise of seed `--seed + j`, whatever the batch size, so rows
differ only by what the row says. Samples already on disk with the same settings are reused: an
interrupted evaluation continues where it stopped, and re-scoring costs no sampling.
"""

from __future__ import annotations

import argparse
import sys
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from minidream import formats, pipeline, training
from minidream.cli.sample_command import SAMPLERS
from minidream.cli.script import run_script
from minidream.config import TrainConfig
from minidream.data import open_rgb
from minidream.eval import metrics
from minidream.eval.eval_prompts import subject_kind
from minidream.eval.eval_targets import EvalError, Settings, Target, prompt_set, target, target_from_lora
from minidream.files import save_png, write_json, write_text
from minidream.formats.lora_files import load_lora
from minidream.formats.lora_stack import adapter_names, remove_adapter
from minidream.methods.registry import method_class
from minidream.formats import default_model_path, load_model
from minidream.drawing import labelled_grid

ADAPTER = "evaluated"  # the adapter name the LoRA is loaded under while it is evaluated
THUMB = 256  # grid tiles, px
PAPER = ("Paper (Ruiz et al. 2022, Table 1), DreamBooth on Stable Diffusion: DINO 0.668, CLIP-I 0.803, "
         "CLIP-T 0.305; real images: DINO 0.774, CLIP-I 0.885. Table 3 (Imagen), with / without prior "
         "preservation: PRES 0.493 / 0.664, DIV (LPIPS) 0.391 / 0.371.")


@dataclass
class Row:
    """One line of the table: a target scored with one (sampler, steps)."""

    label: str
    sampler: str
    steps: int
    prior: bool | None
    scores: metrics.Scores
    folder: Path


# ----------------------------------------------------------------------------- sampling

def file_id(path: Path | None) -> str:
    """A short content hash: a sample on disk is reused only if it came from these exact weights."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path else "none"


def initial_noise(model, seeds: list[int], size: int) -> torch.Tensor:
    """x_T for each seed, drawn exactly as pipeline.sample_latents draws it for a batch of one,
    so an image does not depend on the batch it was made in; (len(seeds), 4, size/f, size/f) for the
    VAE's downsampling factor f (model.vae_scale: SDXL 8, the bundled tiny model 4)."""
    dtype = next(model.text.output_encoder.parameters()).dtype
    return torch.cat([pipeline.initial_noise(model, 1, size, size, torch.Generator("cpu").manual_seed(s), dtype) for s in seeds])


def samples(model, prompt: str, paths: list[Path], seeds: list[int], meta: dict[str, str],
            batch_size: int) -> list[Image.Image]:
    """One image per seed; a PNG already at its path with the same prompt, seed and settings is reused."""
    def wanted(seed):
        return {**meta, "prompt": prompt, "seed": str(seed)}

    images: dict[int, Image.Image] = {}
    for i, (path, seed) in enumerate(zip(paths, seeds)):
        if path.is_file():
            with Image.open(path) as img:
                if all(img.text.get(k) == v for k, v in wanted(seed).items()):
                    images[i] = img.convert("RGB")
    todo = [i for i in range(len(seeds)) if i not in images]
    size = int(meta["size"])
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        noise = initial_noise(model, [seeds[i] for i in batch], size)
        out = pipeline.generate(model, prompt, sampler=SAMPLERS[meta["sampler"]], steps=int(meta["steps"]),
                       guidance_scale=float(meta["guidance_scale"]), height=size, width=size,
                       num_images=len(batch), initial_latents=noise, progress=False)
        for i, img in zip(batch, out):
            save_png(paths[i], img, wanted(seeds[i]))
            images[i] = img
    return [images[i] for i in range(len(seeds))]


def thumbnails(images: list[Image.Image]) -> list[Image.Image]:
    out = []
    for img in images:
        img = img.copy()
        img.thumbnail((THUMB, THUMB))
        out.append(img)
    return out


def evaluate_one(model, t: Target, s: Settings, sampler: str, steps: int, folder: Path, clip, dino,
                 real: list[Image.Image]) -> Row:
    """Sample the prompt set and the class prompt with one sampler setting, score, write the folder."""
    prompts = prompt_set(t, s)
    size = s.size or t.size or model.default_size
    guidance = next(g for g in (s.guidance_scale, t.guidance_scale, 5.0) if g is not None)
    meta = {"sampler": sampler, "steps": str(steps), "guidance_scale": str(guidance), "size": str(size),
            "lora": str(t.lora), "lora_sha256": file_id(t.lora), "model": model.name,
            "dtype": str(next(model.unet.parameters()).dtype).removeprefix("torch.")}
    seeds = [s.seed + j for j in range(s.images_per_prompt)]
    class_seeds = [s.seed + j for j in range(s.class_images)]
    generated = {}
    with tqdm(total=len(prompts) + bool(class_seeds), desc=f"{t.label} {sampler} x{steps}", unit="prompt") as bar:
        for i, prompt in enumerate(prompts):
            paths = [folder / "images" / f"p{i:02d}-s{seed}.png" for seed in seeds]
            generated[prompt] = samples(model, prompt, paths, seeds, meta, s.batch_size)
            bar.update()
        class_samples = []
        if class_seeds:  # PRES: what the class prompt draws now
            paths = [folder / "class" / f"s{seed}.png" for seed in class_seeds]
            class_samples = samples(model, t.subject.class_prompt, paths, class_seeds, meta, s.batch_size)
            bar.update()
    scores = metrics.score(real, generated, class_samples, t.subject.token, clip, dino, s.div)
    save_png(folder / "grid.png", labelled_grid(thumbnails([im for p in prompts for im in generated[p]]), prompts,
                                                [f"seed {seed}" for seed in seeds]), {"prompts": prompts, "seeds": seeds})
    if class_samples:
        save_png(folder / "class_grid.png", labelled_grid(thumbnails(class_samples), [t.subject.class_prompt],
                                                      [f"seed {seed}" for seed in class_seeds]),
                 {"prompt": t.subject.class_prompt})
    write_json(folder / "metrics.json", {**scores.as_dict(), **meta, "steps": steps, "guidance_scale": guidance,
                                         "size": size, "prompts": prompts, "seeds": seeds,
                                         "class_prompt": t.subject.class_prompt, "prior": t.prior})
    return Row(t.label, sampler, steps, t.prior, scores, folder)


# ----------------------------------------------------------------------------- the table

def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown_table(rows: list[Row], title: str, notes: list[str]) -> str:
    div_kind = rows[0].scores.div_kind if rows else metrics.DIV_DINO
    lines = [f"# {title}", "",
             f"| scheduler | steps | prior | CLIP-I ↑ | CLIP-T ↑ | DINO ↑ | PRES ↓ | DIV ({div_kind}) ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prior = {True: "on", False: "off", None: "?"}[r.prior]
        sc = r.scores
        lines.append(f"| {r.sampler.upper()} | {r.steps} | {prior} | {_f(sc.clip_i)} | {_f(sc.clip_t)} | "
                     f"{_f(sc.dino)} | {_f(sc.pres)} | {_f(sc.div)} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def notes(rows: list[Row], targets: list[Target], s: Settings) -> list[str]:
    first, t = rows[0].scores, targets[0]
    n_prompts = len(prompt_set(t, s))
    kind = "custom" if s.prompts else (s.kind or subject_kind(t.subject.class_noun))
    div = ("1 - mean DINO cosine among the samples of one prompt, NOT the paper's LPIPS: compare it only "
           "within this table" if first.div_kind == metrics.DIV_DINO else "mean LPIPS (AlexNet) distance "
           "among the samples of one prompt, as the paper")
    pres = (f"{s.class_images} samples of \"{t.subject.class_prompt}\" for PRES" if s.class_images
            else "no PRES (--class-images 0)")
    last_seed = s.seed + s.images_per_prompt - 1
    out = [f"Subject: {t.subject.token} {t.subject.class_noun} ({first.real} photos in {t.subject.folder}); "
           f"{n_prompts} {kind} prompts x {s.images_per_prompt} images (seeds {s.seed}..{last_seed}); {pres}.",
           "CLIP-T compares each image with its prompt without the rare token.",
           f"DIV: {div}."]
    if first.real_clip_i is not None:
        out.append(f"The subject's photos among themselves (the paper's 'real images' row): CLIP-I "
                   f"{_f(first.real_clip_i)}, DINO {_f(first.real_dino)}. Samples scoring above this are "
                   f"likely near-copies of the photos (overfitting), not better likenesses.")
    return out + ["Higher is better except PRES (a high PRES means the class prompt draws the subject).", PAPER]


def write_results(out: Path, rows: list[Row], targets: list[Target], s: Settings) -> Path:
    t = targets[0]
    write_json(out / "metrics.json", [{"label": r.label, "sampler": r.sampler, "steps": r.steps, "prior": r.prior,
                                       "folder": str(r.folder), **r.scores.as_dict()} for r in rows])
    title = f"DreamBooth evaluation: {t.subject.token} {t.subject.class_noun}"
    return write_text(out / "metrics.md", markdown_table(rows, title, notes(rows, targets, s)))


# ----------------------------------------------------------------------------- running it

def remove_evaluated_adapter(model) -> None:
    for m in (model.unet, model.text.text_encoder, model.text.text_encoder_2):
        if m is not None and ADAPTER in adapter_names(m):
            remove_adapter(m, ADAPTER)


def run(targets: list[Target], s: Settings, out: Path, *, model_path=None, clip_name=metrics.CLIP_MODEL,
        dino_name=metrics.DINO_MODEL, device=None, dtype=None) -> list[Row]:
    """Evaluate every target with every (sampler, steps); returns the rows, writes <out>/metrics.md."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    # the metric models first: a missing one fails in seconds, not after an hour of sampling
    clip, dino = metrics.load_clip(clip_name, device), metrics.load_dino(dino_name, device)
    paths = {model_path or t.model or str(default_model_path()[0]) for t in targets}
    if len(paths) > 1:
        raise EvalError(f"the LoRAs were trained on different base models ({', '.join(sorted(paths))}); "
                         f"evaluate them separately or pass --model")
    path, t0 = paths.pop(), targets[0]
    if not Path(path).exists():
        raise EvalError(f"base model {path} (where the LoRA was trained) does not exist here: pass --model")
    model = load_model(path, dtype, device, vae=t0.vae, tokenizer=t0.tokenizer)
    rows = []
    for t in targets:
        real = [open_rgb(p) for p in t.subject.images]
        if t.lora:
            load_lora(t.lora, unet=model.unet, text_encoder=model.text.text_encoder,
                      text_encoder_2=model.text.text_encoder_2, name=ADAPTER)
        try:
            for sampler in s.samplers:
                for steps in s.steps:
                    folder = (out / t.label if len(targets) > 1 else out) / f"{sampler}-{steps}"
                    rows.append(evaluate_one(model, t, s, sampler, steps, folder, clip, dino, real))
                    write_results(out, rows, targets, s)  # the table grows row by row
        finally:
            remove_evaluated_adapter(model)
    return rows


def train_pair(subject: str, out: str, model: str | None = None, seed: int = 0, **settings) -> tuple[Path, Path]:
    """The prior-preservation experiment from scratch: train the subject with and without prior
    preservation (train.py's defaults, or `settings`: any TrainConfig field); returns the two run folders."""
    configs = [TrainConfig(subject=subject, out=out, model=model, seed=seed, prior=p, **settings) for p in (True, False)]
    runs = [training.train(cfg, method_class(cfg), models=formats) for cfg in configs]
    return runs[0], runs[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minidream.eval.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a training run folder (config.json + LoRA)")
    p.add_argument("--lora", help="a LoRA file (with --subject)")
    p.add_argument("--subject", help="subject folder: the real photos (+ subject.json)")
    p.add_argument("--prior", help="run folder or LoRA trained WITH prior preservation (8-row experiment)")
    p.add_argument("--no-prior", dest="no_prior", help="run folder or LoRA trained WITHOUT it")
    p.add_argument("--train-pair", action="store_true", help="train the subject with and without prior preservation first (train.py defaults)")
    p.add_argument("--sampler", nargs="+", choices=list(SAMPLERS),
                   help="default: ddim (experiment: ddim pndm)")
    p.add_argument("--steps", nargs="+", type=int, help="default: 50 (experiment: 50 80)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--class-images", type=int, default=16, help="class-prompt samples for PRES (0: skip PRES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--size", type=int, help="image side in px (default: the run's resolution / the model's)")
    p.add_argument("--prompts", nargs="+", help="prompts or a .txt file, one per line; {} = '[V] [class]'")
    p.add_argument("--limit", type=int, help="only the first N prompts (a quick look)")
    p.add_argument("--kind", choices=["live", "object"], help="which DreamBooth prompt list (default: by class noun)")
    p.add_argument("--batch-size", type=int, default=1, help="images per sampler call")
    p.add_argument("--div", choices=["dino", "lpips"], default="dino", help="DIV measure (lpips: pip install lpips)")
    p.add_argument("--clip", default=metrics.CLIP_MODEL, help="CLIP folder or cached hub id")
    p.add_argument("--dino", default=metrics.DINO_MODEL, help="DINO ViT-S/16 folder or cached hub id")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--out", help="output folder (default: <run>/eval, or runs/experiment-<subject>)")
    return p.parse_args(argv)


def main(argv=None) -> list[Row]:
    a = parse_args(argv)
    experiment = bool(a.prior or a.no_prior or a.train_pair)
    if a.train_pair:
        if not a.subject:
            raise EvalError("--train-pair needs --subject DIR")
        a.prior, a.no_prior = map(str, train_pair(a.subject, "runs", a.model, a.seed))
    if experiment:
        if not (a.prior and a.no_prior):
            raise EvalError("the experiment needs both --prior RUN_OR_LORA and --no-prior RUN_OR_LORA")
        targets = [target(a.prior, a.subject, "prior", True), target(a.no_prior, a.subject, "no-prior", False)]
        out = Path(a.out or f"runs/experiment-{targets[0].subject.folder.name}")
    elif a.run:
        targets = [target(a.run, a.subject)]
        out = Path(a.out or Path(a.run) / "eval")
    else:
        targets = [target_from_lora(Path(a.lora) if a.lora else None, a.subject)]  # no --lora: the base model
        lora = Path(a.lora) if a.lora else None
        out = Path(a.out or (lora.parent / f"eval-{lora.stem}" if lora else "runs/eval-base"))
    s = Settings(samplers=a.sampler or (["ddim", "pndm"] if experiment else ["ddim"]),
                 steps=a.steps or ([50, 80] if experiment else [50]), images_per_prompt=a.images_per_prompt,
                 class_images=a.class_images, seed=a.seed, guidance_scale=a.guidance_scale, size=a.size,
                 prompts=a.prompts, limit=a.limit, kind=a.kind, batch_size=a.batch_size, div=a.div)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype)
    rows = run(targets, s, out, model_path=a.model, clip_name=a.clip, dino_name=a.dino, device=a.device, dtype=dtype)
    print((out / "metrics.md").read_text())
    return rows


if __name__ == "__main__":
    sys.exit(run_script("python -m minidream.eval.evaluate", main, out_of_memory="try --batch-size 1 or --dtype fp16"))
