"""diffusers' own DreamBooth LoRA script as the reference of the whole-run benchmark (whole_run.py).

The script, `../shared/reference/train_dreambooth_lora_sdxl.py`, runs unchanged. This module holds
what is needed to run it and read it back:

- `torchvision_site()`: a folder with torchvision, which the script imports (minidream does not):
  installed once by pip into benchmarks/.cache, put on the script's PYTHONPATH only;
- `reference_args()`: its command line for a recipe;
- `reference_losses()`: the per-step losses from its progress bar;
- `sample_diffusers()`: one image from a model (+ LoRA) through StableDiffusionXLPipeline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "train_dreambooth_lora_sdxl.py"
TORCHVISION_SITE = Path(__file__).resolve().parent / ".cache" / "torchvision-site"

# torchvision's wheels on PyPI are built against CUDA torch. With the CPU build of torch its C++ ops
# do not load, and `import torchvision` stops in _meta_registrations.py at the two module-level
# `@torch.library.register_fake("torchvision::nms" / "::qnms")` decorators (the others there are
# already inside `if _has_ops()`). The same guard on those two lets the Python parts import;
# diffusers' script uses only torchvision.transforms. With CUDA torch the guard changes nothing.
UNGUARDED_FAKE = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.MULTILINE)
GUARDED_FAKE = (r'@(torch.library.register_fake("torchvision::\1")'
                r' if torchvision.extension._has_ops() else (lambda f: f))')


def torchvision_version() -> str:
    """The torchvision release made with this torch: torch 2.N pairs with torchvision 0.(N + 15)."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if major != 2:
        raise SystemExit(f"no torchvision pairing known for torch {torch.__version__}; pass --torchvision-dir")
    return f"0.{minor + 15}.0"


def torchvision_site(folder: Path = TORCHVISION_SITE) -> Path:
    """A folder with torchvision (no dependencies: torch is the venv's own), installed once."""
    if (folder / "torchvision").is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    version = torchvision_version()
    print(f"installing torchvision=={version} into {folder} (for diffusers' script only)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial),
                    f"torchvision=={version}"], check=True)
    registrations = partial / "torchvision" / "_meta_registrations.py"
    text, guarded = UNGUARDED_FAKE.subn(GUARDED_FAKE, registrations.read_text())
    registrations.write_text(text)
    print(f"guarded {guarded} fake-op registrations in {registrations.name}")
    partial.rename(folder)
    return folder


def reference_args(out: Path, r, subject: Path, instance: str, klass: str, seed: int) -> list[str]:
    """The script's command line for recipe `r` (whole_run.Recipe), writing under `out`. The script
    opens every file of --instance_data_dir as an image, so it gets a copy of the PNGs alone."""
    photos = out / "instance"
    photos.mkdir(parents=True)
    for png in sorted(subject.glob("*.png")):
        shutil.copy(png, photos / png.name)
    args = [str(REFERENCE), "--pretrained_model_name_or_path", str(r.model), "--instance_data_dir", str(photos),
            "--instance_prompt", instance, "--class_prompt", klass, "--with_prior_preservation",
            "--prior_loss_weight", "1.0", "--num_class_images", str(r.class_images),
            "--class_data_dir", str(out / "class"), "--output_dir", str(out / "lora"),
            "--resolution", str(r.resolution), "--rank", str(r.rank), "--learning_rate", str(r.lr),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(r.steps),
            "--train_batch_size", "1", "--checkpointing_steps", str(r.save_every),
            "--checkpoints_total_limit", "2", "--random_flip", "--mixed_precision", "no", "--seed", str(seed),
            "--optimizer", "AdamW", "--adam_weight_decay", str(r.weight_decay), "--max_grad_norm", str(r.max_norm)]
    return args + (["--gradient_checkpointing"] if r.gradient_checkpointing else [])


STEP_BAR = re.compile(r"Steps:.*?\|\s*(\d+)/\d+ \[[^\]]*?loss=([-+0-9.eE]+)")


def reference_losses(stderr_log: Path) -> list[float]:
    """Every step's loss from the script's progress bar: it calls `set_postfix(loss=...)` after each
    step, which redraws the bar; the last drawing of step k carries step k's loss."""
    by_step: dict[int, float] = {}
    for frame in re.split(r"[\r\n]", stderr_log.read_text(errors="replace")):
        match = STEP_BAR.search(frame)
        if match:
            by_step[int(match.group(1))] = float(match.group(2))
    return [by_step[k] for k in sorted(by_step) if k > 0]


def sample_diffusers(model: Path, lora_dir: Path | None, prompt: str, seed: int, steps: int, guidance: float,
                     size: int):
    """One image through diffusers' StableDiffusionXLPipeline (DDIM), with the LoRA in lora_dir if given."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                height=size, width=size).images[0]
