"""The subject folder, class (prior) images, and SDXL-style crops.

DreamBooth (Ruiz et al. 2022) fine-tunes on a few photos of one subject, captioned "a photo of [V]
[class noun]" with a rare token [V]. A subject folder holds them (any size) and maybe subject.json,
{"token": "rraj", "class_noun": "person"} (+ instance_prompt, class_prompt, validation_prompts).
Beside a photo NN.jpg may lie NN.txt, its own caption, and NN-masklabel.png, its mask (white =
subject; the conventions of kohya sd-scripts and OneTrainer)."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from minidream.errors import UserError
from minidream.files import read_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SETTINGS_FILE = "subject.json"
CAPTION_SUFFIX, MASK_SUFFIX = ".txt", "-masklabel.png"  # NN.txt, NN-masklabel.png beside NN.jpg


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
    captions: dict[Path, str] = field(default_factory=dict)  # photo -> its caption (NN.txt)
    masks: dict[Path, Path] = field(default_factory=dict)  # photo -> its mask file


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
    images = find_images(folder)
    masks = {p: p.with_name(p.stem + MASK_SUFFIX) for p in images}
    return Subject(folder, images, token, class_noun,
                   instance_prompt or settings.get("instance_prompt") or default,
                   class_prompt or settings.get("class_prompt") or f"a photo of {class_noun}",
                   settings.get("validation_prompts"), read_captions(images, token),
                   {p: mask for p, mask in masks.items() if mask.exists()})


def read_captions(images: list[Path], token: str) -> dict[Path, str]:
    """Each photo's NN.txt, if there is one, on one line. A caption is used instead of the instance
    prompt, so one without the token would not teach the subject's name: a warning names it."""
    captions = {p: " ".join(p.with_suffix(CAPTION_SUFFIX).read_text(errors="replace").split())
                for p in images if p.with_suffix(CAPTION_SUFFIX).is_file()}
    warn_all([p.with_suffix(CAPTION_SUFFIX).name for p, c in captions.items()
              if token not in c.split()], f"caption(s) without the token {token!r}")
    return captions


def find_images(folder: Path) -> list[Path]:
    """Image files of a folder by suffix, not masks; stray files (not captions or masks) warn."""
    images, others = [], []
    for path in sorted(folder.iterdir()):
        if not (path.name.startswith(".") or path.name == SETTINGS_FILE or path.is_dir()):
            image = path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith(MASK_SUFFIX)
            (images if image else others).append(path)
    beside = {p.stem + end for p in images for end in (CAPTION_SUFFIX, MASK_SUFFIX)}
    warn_all([p.name for p in others if p.name not in beside],
             f"non-image file(s) in {folder} skipped")
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
        if img.width * img.height < 0.9 * resolution**2:  # below the smallest bucket's pixels
            small.append(f"{path.name} ({img.size[0]}x{img.size[1]})")
        yield path, img
    warn_all(unreadable, f"unreadable {what} image(s) skipped")
    warn_all(small, f"{what} image(s) smaller than the training resolution {resolution} px "
                    f"({resolution}x{resolution} pixels), upscaled (so soft)")


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


def load_masks(instance_images: list[tuple], masks: dict[Path, Path]) -> list:
    """Each photo's mask as a grey PIL image (white = subject) or None. A mask must be the photo's
    size as shown (after its EXIF rotation) and not all black (nothing would be learned)."""
    out = []
    for path, img in instance_images:
        if path not in masks:
            out.append(None)
            continue
        try:
            mask = Image.open(masks[path]).convert("L")
        except Exception as e:  # noqa: BLE001  (decoders raise many types)
            raise DataError(f"{masks[path]} is not a readable mask ({e}): re-export it") from None
        if mask.size != img.size:
            raise DataError(f"{masks[path]} is {mask.width}x{mask.height} but {path.name} is "
                            f"{img.width}x{img.height} as shown: make the mask the photo's size")
        if mask.getextrema()[1] == 0:
            raise DataError(f"{masks[path]} is all black (no subject): paint the subject white, "
                            "or delete the mask to train on the whole photo")
        out.append(mask)
    return out


# ----------------------------------------------------------------------------- aspect buckets

def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (Podell et al. 2023, "SDXL", sec. 2.3 and app. I): every (height, width)
    in steps of resolution/16 px (64 at 1024; at least `multiple`, what the VAE and UNet halvings
    need) with 0.9..1 times resolution**2 pixels and sides from resolution/2 to 2 * resolution.
    At 1024 px this is SDXL's own table: (512, 2048), (576, 1792), ..., (1024, 1024), ..."""
    step = max(resolution // 16 // multiple * multiple, multiple)
    sides = range(step * -(-resolution // 2 // step), 2 * resolution + 1, step)
    area = resolution * resolution
    return [(h, w) for h in sides for w in sides if 0.9 * area <= h * w <= area]


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest a (height, width) in log aspect ratio (2:1 and 1:2 as far from 1:1)."""
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - math.log(size[1] / size[0])))


@dataclass
class View:
    """One training view of an image: pixels plus the SDXL micro-conditioning numbers."""

    pixels: torch.Tensor  # (3, h, w) in [-1, 1]: the bucket's size
    original_size: tuple[int, int]  # (height, width) of the file's image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    flipped: bool
    mask: torch.Tensor | None = None  # (1, h, w) in [0, 1], cropped and flipped with the pixels


def make_view(img: Image.Image, size: tuple[int, int], rng: random.Random, flip: bool,
              center=False, mask: Image.Image | None = None) -> View:
    """Resize to cover size = (height, width), crop it (random or centred), maybe flip; a mask
    follows the same resize, flip and crop."""
    original_size, scale = (img.height, img.width), max(size[0] / img.height, size[1] / img.width)
    width, height = max(size[1], round(img.width * scale)), max(size[0], round(img.height * scale))
    pictures = [img.resize((width, height), Image.Resampling.BICUBIC)]
    if mask is not None:
        pictures.append(mask.resize((width, height), Image.Resampling.BILINEAR))
    if flip:
        pictures = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in pictures]
    offset = (lambda room: room // 2) if center else (lambda room: rng.randint(0, room))
    top, left = offset(height - size[0]), offset(width - size[1])
    pictures = [p.crop((left, top, left + size[1], top + size[0])) for p in pictures]
    mask_tensor = None
    if mask is not None:  # (1, h, w) in [0, 1]
        mask_tensor = torch.from_numpy(np.asarray(pictures[1], dtype=np.float32) / 255.0)[None]
    return View(to_tensor(pictures[0]), original_size, (top, left), flip, mask_tensor)


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
