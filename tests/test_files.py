"""Atomic writes: a failed write leaves the previous file intact and no temporary behind."""

import errno

import pytest
from PIL import Image

from minidream.cli.sample_command import image_grid
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


def test_grid_layout():
    grid = image_grid([Image.new("RGB", (5, 4))] * 5, columns=3)
    assert grid.size == (15, 8)
