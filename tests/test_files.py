"""Atomic writes: a failed write leaves the previous file intact and no temporary behind."""

import errno
import os
import stat

import pytest
from PIL import Image

from minidream.drawing import MIN_TILE, labelled_grid
from minidream.files import atomic_write, save_png, write_json


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt.json"
    write_json(target, {"step": 1})

    def disk_full(tmp):
        tmp.write_text('{"step": 2, "half')  # half-written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, disk_full)
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"step":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]


def test_png_metadata_roundtrip(tmp_path):
    path = save_png(tmp_path / "a.png", Image.new("RGB", (4, 4)), {"prompt": "a photo", "seed": 3})
    info = Image.open(path).text
    assert info["prompt"] == "a photo" and info["seed"] == "3"


def test_written_files_get_the_users_usual_permissions(tmp_path):
    mask = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "x.bin", lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 under the umask, not the writer's 0o600


def test_labelled_grid_has_a_row_per_label_and_the_label_on_it():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    images = [Image.new("RGB", (MIN_TILE, MIN_TILE), c) for c in colours]  # 2 prompts x 3 images, row by row
    grid = labelled_grid(images, ["a photo of rraj person", "a dog"], ["seed 0", "seed 1", "seed 2"])
    label_width, top = grid.width - 3 * MIN_TILE, grid.height - 2 * MIN_TILE
    assert 0 < label_width < 2 * MIN_TILE and 0 < top < MIN_TILE // 2  # compact label column, a header row
    for row in range(2):
        for col in range(3):
            centre = (label_width + col * MIN_TILE + MIN_TILE // 2, top + row * MIN_TILE + MIN_TILE // 2)
            assert grid.getpixel(centre) == colours[3 * row + col]
        label = grid.crop((0, top + row * MIN_TILE, label_width, top + (row + 1) * MIN_TILE)).convert("L")
        assert label.getextrema()[0] < 128  # text drawn on each row
    header = grid.crop((label_width, 0, grid.width, top)).convert("L")
    assert header.getextrema()[0] < 128
