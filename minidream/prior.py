"""Class images for prior preservation (Ruiz et al. 2022, sec. 3.3, eq. 2; step.py), made by the
*base* model itself so the class does not drift towards the subject. Only missing images are made,
each written atomically as class-NNNNN.png with seed = class_seed + NNNNN: an interrupted
generation resumes, and image NNNNN is the same whenever it is made (bit for bit one per UNet
call; in batches up to the rounding of a larger matmul, pixel values within 1)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidream.data import DataError, class_image_folder, existing_class_images
from minidream.files import save_png
from minidream.pipeline import generate
from minidream.samplers import ddim

NAME = re.compile(r"^class-(\d{5})\.png$")
CPU_CLASS_BATCH = 1  # "0: auto" on a CPU: a mid-size UNet gains nothing (benchmarks/class_batch.py)


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
                      steps: int = 30, guidance_scale: float = 5.0, sampler=ddim, batch: int = 0,
                      negative_prompt: str | None = None, progress: bool = True, dist=None):
    """Generate the plan's missing images with `model` (the base model, before any LoRA) and return
    the images training uses. With dist (torchrun), rank r makes missing image r, r + N, ...
    batch: images per UNet call (0: class_batch_size's choice after the first image); each image's
    x_T is drawn from its own seed, whatever the batch."""
    if plan.missing:
        taken = {int(m.group(1)) for p in plan.folder.iterdir() if (m := NAME.match(p.name))}
        free = [i for i in range(len(taken) + plan.missing) if i not in taken][: plan.missing]
        rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
        barrier = dist.barrier if dist else (lambda: None)
        barrier()  # every rank listed the folder before any rank writes to it
        settings = {"steps": steps, "guidance_scale": guidance_scale}
        mine, done, desc = free[rank::world], 0, f"class images for {prompt!r}"
        with tqdm(total=len(mine), desc=desc, disable=not progress) as bar:
            while done < len(mine):
                ids, device = mine[done : done + (batch or 1)], model.unet.conv_in.weight.device
                if not batch and device.type == "cuda":  # class_batch_size reads this image's peak
                    torch.cuda.reset_peak_memory_stats(device)
                images = generate(model, [prompt], negative_prompt, sampler=sampler, **settings,
                                  seed=[seed + i for i in ids], num_images=len(ids),
                                  height=resolution, width=resolution, progress=False)
                for i, image in zip(ids, images):
                    save_png(plan.folder / f"class-{i:05d}.png", image,
                             {"prompt": prompt, "seed": seed + i, "sampler": sampler.__name__,
                              **settings, "model": getattr(model, "name", "")})
                done, batch = done + len(ids), batch or class_batch_size(model)
                bar.update(len(ids))
        barrier()  # every share is written
        plan = ClassImagePlan(plan.folder, existing_class_images(plan.folder), plan.wanted)
    return plan.used()


def class_batch_size(model, most: int = 8) -> int:
    """Class images per UNet call, chosen after one image was made alone: on a GPU as many as 80%
    of its free memory holds at that image's peak (an overestimate: the VAE decode, one image at a
    time, is in it), at most `most`; on a CPU, CPU_CLASS_BATCH (the tiny preset asks for 8)."""
    device = model.unet.conv_in.weight.device
    if device.type != "cuda":
        return CPU_CLASS_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    one = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    return max(1, min(most, int(0.8 * free / max(one, 1))))
