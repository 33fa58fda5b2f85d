"""Class images for prior preservation (Ruiz et al. 2022, sec. 3.3, eq. 2; step.py), made by the
*base* model itself so the class does not drift towards the subject. Only missing images are made,
each written atomically as class-NNNNN.png with seed = class_seed + NNNNN: an interrupted
generation resumes, and image NNNNN is the same whenever it is made."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from minidream.data import DataError, class_image_folder, existing_class_images
from minidream.files import save_png
from minidream.pipeline import generate
from minidream.samplers import ddim

NAME = re.compile(r"^class-(\d{5})\.png$")


@dataclass
class ClassImagePlan:
    folder: Path  # where the class images are (a .zip is unpacked beside itself)
    existing: list[Path]  # images already there, sorted
    wanted: int  # how many training uses

    @property
    def missing(self) -> int:
        return max(0, self.wanted - len(self.existing))

    def used(self) -> list[Path]:
        """The images training reads: the first `wanted` in name order (all, if fewer)."""
        return self.existing[: self.wanted]


def plan_class_images(class_dir, wanted: int, can_generate: bool) -> ClassImagePlan:
    """Look at the class folder before any model is loaded: DataError now if it holds too few
    images and none may be generated (no hour of training lost to a late failure)."""
    if wanted < 1:
        raise DataError(f"--num-class-images must be >= 1, not {wanted} (or train with --no-prior)")
    folder = class_image_folder(class_dir)
    plan = ClassImagePlan(folder, existing_class_images(folder), wanted)
    few = f"{folder} holds {len(plan.existing)} class image(s) but {wanted} are needed, and"
    if plan.missing and not can_generate:
        raise DataError(f"{few} class-image generation is off (--no-generate): add images, lower "
                        f"--num-class-images to {len(plan.existing)}, drop --no-generate, or "
                        "train with --no-prior")
    if plan.missing and not os.access(folder, os.W_OK):
        raise DataError(f"{few} the folder is not writable, so the missing {plan.missing} cannot "
                        "be generated: pass a writable --class-dir, lower --num-class-images, or "
                        "train with --no-prior")
    return plan


def fill_class_folder(plan: ClassImagePlan, model, prompt: str, *, resolution: int, seed: int = 0,
                      steps: int = 30, guidance_scale: float = 5.0, sampler=ddim,
                      negative_prompt: str | None = None, progress: bool = True, dist=None):
    """Generate the plan's missing images with `model` (the base model, before any LoRA) and return
    the images training uses. With dist (torchrun), rank r makes missing image r, r + N, ..."""
    if plan.missing:
        taken = {int(m.group(1)) for p in plan.folder.iterdir() if (m := NAME.match(p.name))}
        free = [i for i in range(len(taken) + plan.missing) if i not in taken][: plan.missing]
        rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
        barrier = dist.barrier if dist else (lambda: None)
        barrier()  # every rank listed the folder before any rank writes to it
        settings = {"steps": steps, "guidance_scale": guidance_scale}
        for i in tqdm(free[rank::world], desc=f"class images for {prompt!r}", disable=not progress):
            image = generate(model, prompt, negative_prompt, sampler=sampler, **settings,
                             seed=seed + i, height=resolution, width=resolution, progress=False)[0]
            save_png(plan.folder / f"class-{i:05d}.png", image, {"prompt": prompt, "seed": seed + i,
                     "sampler": sampler.__name__, **settings, "model": getattr(model, "name", "")})
        barrier()  # every share is written
        plan = ClassImagePlan(plan.folder, existing_class_images(plan.folder), plan.wanted)
    return plan.used()
