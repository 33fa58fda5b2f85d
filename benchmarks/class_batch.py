"""Class images per UNet call on a CPU: s/image at batch 1, 2, 4, 8 (--class-batch, its presets).

prior.fill_class_folder draws class images `batch` at a time, each from its own seed (the same
image in any batch). On a GPU the batch follows the free memory; on a CPU it is a fixed number,
chosen from this table: the bundled tiny model at 64 px and the mid-size SDXL-shaped model of
benchmarks a and b at 256 px, DDIM 20 steps, guidance 5, one torch thread, interleaved rounds.

    python -m benchmarks.class_batch [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()
import torch  # noqa: E402

from benchmarks.sampling import write_model  # noqa: E402
from minidream.config import PRESETS  # noqa: E402
from minidream.formats.models import BUNDLED_MODEL, REPO, load_model  # noqa: E402
from minidream.prior import CPU_CLASS_BATCH, fill_class_folder, plan_class_images  # noqa: E402

BATCHES = (1, 2, 4, 8)
MODELS = {"tiny, 64 px": (lambda: REPO / BUNDLED_MODEL, 64, 16), "mid, 256 px": (write_model, 256, 8)}


def case(model, size: int, images: int, batch: int):
    """One round: `images` class images into a fresh folder, `batch` per UNet call."""
    def run() -> dict:
        with tempfile.TemporaryDirectory() as folder:
            plan = plan_class_images(Path(folder), images, True)
            fill_class_folder(plan, model, "a photo of person", resolution=size, steps=20, batch=batch,
                              progress=False)
        return {}
    return harness.timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (path, size, images) in MODELS.items():
        model = load_model(path())
        runs = harness.interleave({b: case(model, size, images, b) for b in BATCHES}, args.repeats)
        one = harness.median(runs[1], "s") / images
        for b in BATCHES:
            per_image = harness.median(runs[b], "s") / images
            rows.append([name, b, images, f"{per_image:.3f}", f"{per_image / one:.2f}"])
    body = "\n".join([
        "## Class images per UNet call on a CPU (--class-batch)", "",
        f"Command: `{harness.command_line()}`", "", harness.machine_lines(harness.machine(1)), "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        harness.markdown_table(["model", "batch", "images per round", "s / image (median)",
                                "ratio to batch 1"], rows), "",
        f"The tiny preset draws {PRESETS['tiny', 'lora']['class_batch']} per call (its demo's figures were measured "
        f"so; 8 per call would round differently); the SDXL preset's 0 draws as many as the free GPU memory holds, "
        f"and {CPU_CLASS_BATCH} on a CPU (prior.CPU_CLASS_BATCH), where a mid-size UNet gains nothing. "
        "`--class-batch 8` makes the tiny model's class images 1.8x faster."])
    print(body)
    harness.write_section("class-batch", body)


if __name__ == "__main__":
    main()
