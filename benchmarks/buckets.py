"""minidream's aspect-ratio buckets beside SDXL's table and kohya sd-scripts' bucket manager, and the
buckets and SDXL time ids the real DreamBooth photos get.

    python -m benchmarks.buckets        # writes benchmarks/BUCKETS.md

kohya's rule, as library/train_util.py's make_bucket_resolutions and BucketManager have it (read,
not imported: kohya is not installed here): buckets of max_area = max_reso's pixels, sides in steps of
`divisible` from min_size to max_size; for each width w, the height min(max_size, (max_area // w)
floored to `divisible`), both ways round, plus the square of side floor(sqrt(max_area)); a photo goes
to the bucket whose w / h is nearest its own (a plain difference of ratios).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from minidream.data import bucket_sizes, find_images, make_view, nearest_bucket, open_rgb

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO.parent / "shared" / "dreambooth-dataset"
# kohya's defaults for SDXL LoRA (--resolution 1024 --min_bucket_reso 256 --max_bucket_reso 1024,
# --bucket_reso_steps 64), and the 2048 ceiling SDXL guides often pass
PHONE_FRAMES = ((3, 4), (9, 16), (16, 9))  # every photo here is square: cuts of 00.jpg stand in for phone photos
KOHYA_SETTINGS = ((1024, 256, 1024, 64), (1024, 256, 2048, 64))
RATIOS = ((1, 4), (3, 10), (9, 21), (1, 2), (9, 16), (2, 3), (7, 10), (3, 4), (4, 5), (1, 1), (5, 4), (4, 3),
          (3, 2), (16, 9), (2, 1), (21, 9), (4, 1))  # width : height


def kohya_buckets(resolution: int, min_size: int, max_size: int, divisible: int) -> list[tuple[int, int]]:
    """kohya's bucket list as (height, width)."""
    area = resolution * resolution
    side = int(math.sqrt(area) // divisible) * divisible
    out = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int(area // width // divisible) * divisible)
        if height >= min_size:
            out |= {(height, width), (width, height)}
    return sorted(out)


def kohya_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """kohya's choice: the nearest width / height ratio, as a plain difference."""
    return min(buckets, key=lambda b: abs(b[1] / b[0] - size[1] / size[0]))


def fmt(b: tuple[int, int]) -> str:
    return f"{b[1]}x{b[0]}"  # width x height, as people write image sizes


def lists_section(ours: list) -> list[str]:
    lines = ["## The bucket lists at 1024 px", "",
             f"minidream: {len(ours)} buckets (`data.bucket_sizes(1024, 32)`), 0.9 to 1.0 x 1024^2 pixels, sides "
             "512 to 2048 in steps of 64: SDXL's own table (Podell et al. 2023, app. I), pair for pair "
             "(tests/test_photos.py checks it against the table typed from the paper).", ""]
    for resolution, low, high, step in KOHYA_SETTINGS:
        theirs = kohya_buckets(resolution, low, high, step)
        only_theirs, only_ours = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        lines += [f"kohya (max_reso 1024x1024, min {low}, max {high}, steps {step}): {len(theirs)} buckets, "
                  f"{len(set(theirs) & set(ours))} shared with minidream's.",
                  f"- kohya only: {', '.join(map(fmt, only_theirs)) or 'none'}",
                  f"- minidream only: {', '.join(map(fmt, only_ours)) or 'none'}", ""]
    return lines


def share_differing(ours: list, theirs: list, n: int = 2001) -> float:
    """Share of aspect ratios, log-evenly spaced from 1:4 to 4:1, whose buckets differ."""
    sizes = [(1000.0, 1000.0 * 16 ** (i / (n - 1)) / 4) for i in range(n)]
    return sum(nearest_bucket(s, ours) != kohya_bucket(s, theirs) for s in sizes) / n


def assignment_section(ours: list) -> list[str]:
    theirs = kohya_buckets(*KOHYA_SETTINGS[1])
    lines = ["## Which bucket a photo's aspect ratio goes to (width x height)", "",
             f"Over aspect ratios log-evenly spaced from 1:4 to 4:1, the two rules pick another bucket for "
             f"{100 * share_differing(ours, ours):.0f}% of them on the same list (minidream's), and kohya's list "
             f"and rule (max 2048) for {100 * share_differing(ours, theirs):.0f}%.", "",
             "| photo w:h | minidream | its pixels | kohya (max 2048) | its pixels |", "| --- | --- | --- | --- | --- |"]
    for w, h in RATIOS:
        size = (1000 * h, 1000 * w)  # (height, width)
        a, b = nearest_bucket(size, ours), kohya_bucket(size, theirs)
        mark = "" if a == b else " (differs)"
        lines.append(f"| {w}:{h} | {fmt(a)}{mark} | {a[0] * a[1] / 1024**2:.2f} MP | {fmt(b)} | "
                     f"{b[0] * b[1] / 1024**2:.2f} MP |")
    return lines


def photos_section(ours: list) -> list[str]:
    lines = ["## The real DreamBooth photos (../shared/dreambooth-dataset) at 1024 px, centre crops", "",
             "Every photo of this dataset is square, so all fall in the 1024x1024 bucket; centre cuts of each "
             "subject's 00.jpg at 3:4, 9:16 and 16:9 show what phone photos get.", "",
             "| photo | size (w x h, as shown) | bucket (w x h) | time ids (orig h, w, crop top, left, target h, w) |",
             "| --- | --- | --- | --- |"]
    for folder in sorted(p for p in PHOTOS.iterdir() if p.is_dir()):
        for path in find_images(folder):
            img = open_rgb(path)
            bucket = nearest_bucket((img.height, img.width), ours)
            view = make_view(img, bucket, random.Random(0), flip=False, center=True)
            ids = [*view.original_size, *view.crop_top_left, *bucket]
            lines.append(f"| {folder.name}/{path.name} | {img.width} x {img.height} | {fmt(bucket)} | {ids} |")
            for w, h in PHONE_FRAMES if path.name == "00.jpg" else ():  # what a phone would frame
                side = min(img.width * h // w, img.height)  # the largest w:h centre cut
                cut = img.crop(((img.width - side * w // h) // 2, (img.height - side) // 2,
                                (img.width + side * w // h) // 2, (img.height + side) // 2))
                bucket = nearest_bucket((cut.height, cut.width), ours)
                view = make_view(cut, bucket, random.Random(0), flip=False, center=True)
                ids = [*view.original_size, *view.crop_top_left, *bucket]
                lines.append(f"| ... its {w}:{h} centre cut | {cut.width} x {cut.height} | {fmt(bucket)} | {ids} |")
    return lines


def main() -> Path:
    ours = bucket_sizes(1024, 32)
    text = [__doc__.split("\n\n")[0].replace("\n", " "), "", "`python -m benchmarks.buckets`", "",
            *lists_section(ours),
            "Differences: kohya keeps the pixel count at most 1024^2 and lets it fall as far as the side limits allow "
            "(so its list holds much smaller buckets, e.g. 256 x 1024 = 0.25 MP at max 1024); minidream, like SDXL's "
            "table, keeps every bucket within 10% of 1024^2 pixels, the size SDXL was trained at, and lets the sides "
            "run from 512 to 2048 instead. kohya chooses a bucket by the plain difference of w / h ratios, minidream by "
            "the difference of their logarithms, so 2:1 and 1:2 are equally far from 1:1; the two choices differ "
            "only near the midpoints between two buckets (1% of ratios, figures below). Both resize a photo to cover its bucket "
            "and crop the rest.", "",
            *assignment_section(ours), "", *photos_section(ours)]
    out = REPO / "benchmarks" / "BUCKETS.md"
    out.write_text("\n".join(text) + "\n")
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
