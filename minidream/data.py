"""The subject folder, class (prior) images, and SDXL-style crops.

DreamBooth (Ruiz et al. 2022) fine-tunes on a few photos of one subject, captioned "a photo of [V]
[class noun]" with a rare token [V]. A subject folder holds them (any size) and maybe subject.json,
{"token": "rraj", "class_noun": "person"} (+ instance_prompt, class_prompt, validation_prompts)."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from minidream.errors import UserError
from minidream.files import read_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SETTINGS_FILE = "subject.json"


class DataError(UserError):
    """Bad training data: the message names the file and the fix."""


# ----------------------------------------------------------------------------- subject

@dataclass
class Subject:
    """Who or what is learned, and how it is named in prompts."""

    folder: Path
    images: list[Path]  # usable instance images, sorted by name
    token: str  # the rare identifier [V], e.g. "rraj"
    class_noun: str  # e.g. "person"
    instance_prompt: str  # "a photo of rraj person"
    class_prompt: str  # "a photo of person"
    validation_prompts: list[str] | None = None  # prompts to watch during training (subject.json)


def load_subject(folder, token=None, class_noun=None, instance_prompt=None, class_prompt=None):
    """Read a subject folder; command-line values override `subject.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = (f"is a file: pass its folder {folder.parent}" if folder.is_file()
                   else "does not exist: create it and put 5-6 photos of the subject in it")
        raise DataError(f"subject folder {folder} {problem}")
    path = folder / SETTINGS_FILE
    settings = read_json(path, DataError) if path.exists() else {}
    token, class_noun = token or settings.get("token"), class_noun or settings.get("class_noun")
    if not token or not class_noun:
        raise DataError(f"no rare token / class noun for {folder}: pass --token and --class-noun, "
                        f'or write {path} with {{"token": "rraj", "class_noun": "person"}}')
    default = f"a photo of {token} {class_noun}"
    return Subject(folder, find_images(folder), token, class_noun,
                   instance_prompt or settings.get("instance_prompt") or default,
                   class_prompt or settings.get("class_prompt") or f"a photo of {class_noun}",
                   settings.get("validation_prompts"))


def find_images(folder: Path) -> list[Path]:
    """Image files of a folder by suffix; other files are skipped with a warning."""
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if not (path.name.startswith(".") or path.name == SETTINGS_FILE or path.is_dir()):
            (images if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    warn_all([p.name for p in skipped], f"non-image file(s) in {folder} skipped")
    if not images:
        raise DataError(f"no images in {folder}: add 5-6 photos ({', '.join(IMAGE_SUFFIXES)})")
    return images


# ----------------------------------------------------------------------------- images

def open_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB, honouring EXIF orientation (phones store portraits as rotated
    landscape pixels). Transparent images are put on white; 16-bit values scaled, not clipped."""
    try:
        # over Image.MAX_IMAGE_PIXELS (89 MP) PIL warns; refused here (a decompression bomb)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()  # decode now, so a truncated file fails here and not mid-training
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001  (decoders raise many types on damaged or crafted files)
        raise DataError(f"{path} is not a readable image ({e}); re-export or remove it") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray((a / peak * 255.0).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def iter_images(paths: list[Path], resolution: int, what: str = "instance"):
    """(path, RGB image) per readable file, opened one at a time (not all in memory)."""
    unreadable, small = [], []
    for path in paths:
        try:
            img = open_rgb(path)
        except DataError as e:
            unreadable.append(str(e))
            continue
        if min(img.size) < resolution:
            small.append(f"{path.name} ({img.size[0]}x{img.size[1]})")
        yield path, img
    warn_all(unreadable, f"unreadable {what} image(s) skipped")
    warn_all(small, f"{what} image(s) smaller than the training resolution {resolution} px, "
                    "upscaled (so soft)")


def warn_all(problems: list[str], what: str, shown: int = 5) -> None:
    """One warning for many files (the count and the first few), not a line per file."""
    if problems:
        more = "; ..." if problems[shown:] else ""
        warnings.warn(f"{len(problems)} {what}: " + "; ".join(problems[:shown]) + more)


def load_images(paths: list[Path], resolution: int, what: str = "instance") -> list[tuple]:
    """Open every image; unreadable ones are named and skipped, none left is an error."""
    good = list(iter_images(paths, resolution, what))
    if not good:
        raise DataError(f"none of the {len(paths)} {what} image(s) could be read")
    return good


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of PIL RGB images (rounded as in diffusers)."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


@dataclass
class View:
    """One training view of an image: pixels plus the SDXL micro-conditioning numbers."""

    pixels: torch.Tensor  # (3, res, res) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the file's image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    flipped: bool


def make_view(img: Image.Image, resolution: int, rng: random.Random, flip: bool, center=False):
    """Resize the short side to `resolution`, crop a square (random or centred), maybe flip."""
    original_size, scale = (img.height, img.width), resolution / min(img.size)
    width, height = (max(resolution, round(side * scale)) for side in img.size)
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    offset = (lambda room: room // 2) if center else (lambda room: rng.randint(0, room))
    top, left = offset(height - resolution), offset(width - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    return View(to_tensor(img), original_size, (top, left), flip)


# ----------------------------------------------------------------------------- class images

def class_image_folder(class_dir) -> Path:
    """The class-image folder, made if missing (generation fills it); train.py unpacks a .zip."""
    class_dir = Path(class_dir)
    if class_dir.suffix.lower() == ".zip":
        raise DataError(f"--class-dir {class_dir}: train.py unpacks a .zip; pass the folder here")
    class_dir.mkdir(parents=True, exist_ok=True)
    return class_dir


def existing_class_images(folder: Path) -> list[Path]:
    """Class images already present (generation fills up to the requested count)."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
