"""Subject folders, image decoding edge cases, SDXL crops, class-image folders."""

import json
import random
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from minidream.formats.archives import unpack_class_images
from minidream.data import (DataError, class_image_folder, existing_class_images, load_images, load_subject,
                            make_view, open_rgb, to_pil, to_tensor)


def _save(path, mode="RGB", size=(40, 30), color=(200, 10, 10), **kw):
    Image.new(mode, size, color).save(path, **kw)
    return path


def test_subject_settings_and_overrides(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    s = load_subject(tmp_path)
    assert (s.instance_prompt, s.class_prompt) == ("a photo of rraj person", "a photo of person")
    s = load_subject(tmp_path, token="sks", class_noun="dog")
    assert (s.instance_prompt, s.class_prompt) == ("a photo of sks dog", "a photo of dog")
    s = load_subject(tmp_path, instance_prompt="x y", class_prompt="y")
    assert (s.instance_prompt, s.class_prompt) == ("x y", "y")


def test_subject_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_subject(tmp_path / "missing")
    with pytest.raises(DataError, match="--token"):
        _save(tmp_path / "a.png")
        load_subject(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_subject(empty, token="t", class_noun="c")
    (tmp_path / "subject.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_subject(tmp_path)


@pytest.mark.parametrize("content", [b'["rraj", "person"]', b'"rraj"', b"\xff\xfe\x00{", b"[" * 100_000])
def test_subject_json_that_is_no_object_is_a_data_error(tmp_path, content):
    _save(tmp_path / "a.png")
    (tmp_path / "subject.json").write_bytes(content)
    with pytest.raises(DataError, match=r"subject.json is not valid JSON holding an object"):
        load_subject(tmp_path)


def test_subject_given_as_a_file_says_to_pass_its_folder(tmp_path):
    photo = _save(tmp_path / "rraj_0.png")
    with pytest.raises(DataError, match=rf"subject folder {photo} is a file: pass its folder {tmp_path}$"):
        load_subject(photo)


def test_non_image_files_are_skipped_with_a_warning(tmp_path):
    _save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="notes.txt"):
        s = load_subject(tmp_path, token="t", class_noun="c")
    assert [p.name for p in s.images] == ["a.jpg"]


def test_corrupt_and_truncated_images_are_named_and_skipped(tmp_path):
    good = _save(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    full = _save(tmp_path / "full.jpg", size=(64, 64), color=(1, 2, 3))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.warns(UserWarning) as record:
        out = load_images([good, bad, truncated], resolution=8)
    assert [p.name for p, _ in out] == ["good.png"]
    messages = " ".join(str(r.message) for r in record)
    assert "bad.jpg" in messages and "trunc.jpg" in messages
    with pytest.raises(DataError, match="none of the 2"):
        with pytest.warns(UserWarning):
            load_images([bad, truncated], resolution=8)


def test_small_image_warns(tmp_path):
    with pytest.warns(UserWarning, match="smaller than the training resolution"):
        load_images([_save(tmp_path / "s.png")], resolution=1024)


def png_claiming(width, height):
    """The header of a PNG of width x height pixels with (almost) no pixel data: what a decompression bomb shows
    the decoder first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bombs_are_skipped_like_unreadable_images(tmp_path):
    good = _save(tmp_path / "good.png")
    (bomb := tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))  # over twice PIL's limit: its error
    (big := tmp_path / "big.png").write_bytes(png_claiming(12000, 8000))  # over PIL's limit: its warning
    with pytest.warns(UserWarning) as record:
        out = load_images([good, bomb, big], resolution=8)
    assert [p.name for p, _ in out] == ["good.png"]
    (message,) = [str(r.message) for r in record]
    assert message.startswith("2 unreadable instance image(s) skipped") and "bomb.png" in message and "big.png" in message
    assert "20000x20000" in message or "400000000 pixels" in message
    with pytest.raises(DataError, match="is not a readable image"):
        open_rgb(bomb)


def test_many_bad_images_make_one_warning(tmp_path):
    paths = [_save(tmp_path / "good.png", size=(64, 64))]
    for i in range(1000):
        (path := tmp_path / f"bad{i:04d}.jpg").write_bytes(b"not a jpeg")
        paths.append(path)
    paths += [_save(tmp_path / f"small{i}.png", size=(8, 8)) for i in range(30)]
    with pytest.warns(UserWarning) as record:
        out = load_images(paths, resolution=32)
    assert len(out) == 31
    messages = [str(r.message) for r in record]
    assert len(messages) == 2, messages
    assert messages[0].startswith("1000 unreadable instance image(s) skipped: ") and "bad0000.jpg" in messages[0]
    assert "bad0999.jpg" not in messages[0] and messages[0].endswith("; ...")
    assert messages[1].startswith("30 instance image(s) smaller than the training resolution 32 px")


def test_modes_are_converted_to_rgb(tmp_path):
    assert open_rgb(_save(tmp_path / "g.png", "L", color=77)).getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "t.png")
    assert open_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)
    cmyk = _save(tmp_path / "c.jpg", "CMYK", color=(0, 255, 255, 0))  # red in CMYK
    r, g, b = open_rgb(cmyk).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    sixteen.save(tmp_path / "16.png")
    assert open_rgb(tmp_path / "16.png").getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to 255


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_view_crop_and_size_conditioning():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 90, 3), dtype=np.uint8))
    view = make_view(img, (30, 30), random.Random(0), flip=False)
    assert view.pixels.shape == (3, 30, 30) and view.original_size == (60, 90)
    top, left = view.crop_top_left
    assert top == 0 and 0 <= left <= 15  # resized to 30x45: only horizontal room
    expected = to_tensor(img.resize((45, 30), Image.Resampling.BICUBIC).crop((left, 0, left + 30, 30)))
    assert torch.equal(view.pixels, expected)
    centred = make_view(img, (30, 30), random.Random(0), flip=True, center=True)
    assert centred.crop_top_left == (0, 7) and centred.flipped


def test_tensor_roundtrip():
    img = Image.fromarray(np.random.RandomState(1).randint(0, 255, (8, 8, 3), dtype=np.uint8))
    t = to_tensor(img)
    assert t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(to_pil(t[None])[0]), np.asarray(img))


def test_class_folder_and_zip(tmp_path):
    folder = class_image_folder(tmp_path / "cls")
    assert folder.is_dir() and existing_class_images(folder) == []
    zpath = tmp_path / "prior.zip"
    src = _save(tmp_path / "x.png")
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(src, "prior/0001.png")
        z.write(src, "prior/0002.png")
        z.writestr("prior/readme.txt", "not an image")
    unpacked = unpack_class_images(zpath)
    assert unpacked == tmp_path / "prior"
    assert [p.name for p in existing_class_images(unpacked)] == ["0001.png", "0002.png"]
    (tmp_path / "broken.zip").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a valid zip"):
        unpack_class_images(tmp_path / "broken.zip")


def _zeros_zip(path, members):
    """A zip of {name: megabytes of zeros}: deflate packs 1 MB of zeros into 1 KB, a zip bomb's trick."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, megabytes in members.items():
            with archive.open(name, "w", force_zip64=True) as member:
                for _ in range(megabytes):
                    member.write(bytes(2**20))
    return path


@pytest.mark.parametrize("members, refused", [
    ({"prior/big.png": 300}, r"bytes/image 314,572,800 > 268,435,456.*inflation"),  # one image of 300 MB
    ({f"prior/{i:03d}.png": 1 for i in range(150)}, r"inflation 1\d\d > 100"),  # 150 MB in 150 KB
])
def test_zip_bombs_are_refused_before_anything_is_unpacked(tmp_path, members, refused):
    archive = _zeros_zip(tmp_path / "prior.zip", members)
    with pytest.raises(DataError, match=rf"^\S*prior.zip would unpack to .*{refused}.*zip bomb"):
        unpack_class_images(archive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.zip"]  # nothing unpacked


def test_zip_member_names_never_leave_the_folder(tmp_path):
    png = _save(tmp_path / "x.png").read_bytes()
    with zipfile.ZipFile(tmp_path / "prior.zip", "w") as archive:
        for name in ("../../escape.png", "/tmp/absolute.png", "a/../../up.png", "..\\..\\win.png", "ok.png"):
            archive.writestr(name, png)
    folder = unpack_class_images(tmp_path / "prior.zip")
    assert sorted(p.name for p in folder.iterdir()) == ["absolute.png", "escape.png", "ok.png", "up.png"]  # ..\\: hidden
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior", "prior.zip", "x.png"]


def test_damaged_zip_data_is_a_data_error(tmp_path):
    noise = random.Random(0).randbytes(5000) + bytes(20000)
    with zipfile.ZipFile(tmp_path / "prior.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", noise)
    data = bytearray((tmp_path / "prior.zip").read_bytes())
    start = data.find(b"a.png") + 60
    data[start:start + 200] = bytes(b ^ 0x5A for b in data[start:start + 200])  # the deflate stream, garbled
    (tmp_path / "prior.zip").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"prior.zip is not a valid zip archive"):
        unpack_class_images(tmp_path / "prior.zip")
