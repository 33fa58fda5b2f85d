"""Fuzzing the loaders and the command lines with malformed files.

Each test takes a valid file (a safetensors checkpoint, a LoRA, a model folder's configs, an image, a zip,
subject.json), breaks it in many random ways and hands each copy to the real reader. Every outcome must be one
of two: the file is read, or a UserError (one line that names the file) is raised; never another exception, a
hang, or a change to the file. The random cases differ from run to run (FUZZ_SEED=N repeats a run; a failure
names its seed), so new shapes of badness are tried every time; the command-line cases run train.py's and
sample.py's main() on some of them and check the exit code and the one-line message.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sample as sample_script
import train as train_script
from minidream.formats.checkpoint import detect
from minidream.formats import load_unet, load_vae
from minidream.data import DataError, load_images, load_subject
from minidream.errors import UserError
from minidream.formats.archives import unpack_class_images
from minidream.formats.lora_files import load_lora
from minidream.lora import inject_lora
from minidream.lora_file import save_lora
from minidream.formats.loading import TensorRef, read_header, read_tensors
from minidream.formats.models import BUNDLED_MODEL, REPO, model_image_size

TINY = REPO / BUNDLED_MODEL
SEED = int(os.environ.get("FUZZ_SEED", random.SystemRandom().randrange(2**31)))
CASES = 40  # random cases per file kind
SECONDS = 5.0  # the longest any one case may take


def one_of(rng: random.Random, values):
    return values[rng.randrange(len(values))]


def odd_value(rng: random.Random):
    """A JSON value of a kind or size that no field expects."""
    return one_of(rng, [None, True, -1, 0, 2**31, 2**64, 1e308, -0.5, float("nan"), "", "x" * 300, "1e9", [],
                        [1, -2], [[[[]]]], {}, {"a": {"b": [1]}}, "([a-z0-9_]+\\.?)+X", "\u0000\udcff"])


def check_outcome(what: str, read, path: Path | None = None, allowed=(UserError,)):
    """Run read(); it may succeed or raise an allowed error naming `path`, fast, without changing the file."""
    before = path.read_bytes() if path is not None and path.is_file() else None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped images warn; that is one of the allowed outcomes
            read()
    except allowed as e:
        message = str(e)
        assert "Traceback" not in message, f"{what} (FUZZ_SEED={SEED}): {message}"
        if path is not None:
            assert path.name in message, f"{what} (FUZZ_SEED={SEED}): the message does not name {path}: {message}"
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{what} (FUZZ_SEED={SEED}): {type(e).__name__}: {e}") from e
    took = time.perf_counter() - start
    assert took < SECONDS, f"{what} (FUZZ_SEED={SEED}) took {took:.1f} s"
    if before is not None:
        assert path.read_bytes() == before, f"{what} (FUZZ_SEED={SEED}) changed the file"


# ----------------------------------------------------------------------------- safetensors headers

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def valid_header() -> tuple[dict, bytes]:
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
              "__metadata__": {"format": "pt"}}
    return header, bytes(range(32))


def broken_safetensors(rng: random.Random) -> bytes:
    header, data = valid_header()
    kind = rng.randrange(6)
    if kind == 0:  # the 8-byte length says something else
        raw = safetensors_bytes(header, data)
        return struct.pack("<Q", one_of(rng, [0, 1, len(raw), 2**63, 2**64 - 1, rng.randrange(2**40)])) + raw[8:]
    if kind == 1:  # cut anywhere
        raw = safetensors_bytes(header, data)
        return raw[: rng.randrange(len(raw))]
    if kind == 2:  # bytes of the JSON flipped
        raw = bytearray(safetensors_bytes(header, data))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(8, len(raw) - len(data))] = rng.randrange(256)
        return bytes(raw)
    entry = header[one_of(rng, ["a", "b"])]
    if kind == 3:  # a field of a tensor entry gets a value of another kind
        entry[one_of(rng, ["dtype", "shape", "data_offsets"])] = odd_value(rng)
    elif kind == 4:  # plausible but wrong numbers
        entry["dtype"] = one_of(rng, ["I32", "BOOL", "U8", "F64", "F8_E4M3", "C64", "Q4"])
        entry["data_offsets"] = one_of(rng, [[24, 0], [0, 10**12], [0, 8], [-8, 24], [0, 24, 48]])
        entry["shape"] = one_of(rng, [[-1, 3], [2**40, 2**40], [0], [2, 3, 0], []])
    else:  # metadata that is not {str: str}
        header["__metadata__"] = one_of(rng, [odd_value(rng), {"format": odd_value(rng)}, {"k": {"nested": 1}}])
    return safetensors_bytes(header, data)


def test_malformed_safetensors_headers(tmp_path):
    rng = random.Random(SEED)
    for i in range(CASES):
        path = tmp_path / f"case-{i}.safetensors"
        path.write_bytes(broken_safetensors(rng))

        def read(path=path):
            shapes = read_header(path)
            for _ in read_tensors({k: TensorRef(path, k, s) for k, s in shapes.items()}):
                pass

        check_outcome(f"safetensors case {i}", read, path)


# ----------------------------------------------------------------------------- LoRA files

@pytest.fixture(scope="module")
def lora_and_unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    unet = load_unet(TINY / "unet")
    inject_lora(unet, rank=2)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    path = save_lora(folder / "good.safetensors", unet=unet)
    fresh = load_unet(TINY / "unet")
    return path, fresh


def broken_lora(rng: random.Random, good: Path, out: Path) -> None:
    with safe_open(str(good), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    for _ in range(rng.randint(1, 3)):
        key, kind = one_of(rng, sorted(tensors)), rng.randrange(7)
        if kind == 0:
            tensors[key] = torch.full(tensors[key].shape, one_of(rng, [float("nan"), float("inf"), -float("inf")]))
        elif kind == 1:  # another shape: rank 0, a vector, a 0-d tensor, a transposed matrix
            tensors[key] = one_of(rng, [tensors[key][:0], tensors[key].flatten(), torch.tensor(1.0), tensors[key].T,
                                        torch.zeros(3, 5, 7, 9, 2)])
        elif kind == 2:
            tensors[key] = tensors[key].to(one_of(rng, [torch.int32, torch.uint8, torch.bool, torch.float64]))
        elif kind == 3:
            del tensors[key]
        elif kind == 4:  # an alpha entry of an odd shape or value
            tensors[key.replace("lora_A.weight", "alpha")] = one_of(rng, [torch.tensor([1.0, 2.0]),
                                                                          torch.tensor(float("nan")),
                                                                          torch.tensor(0.0)])
        else:  # the LoraConfig metadata, damaged or crafted
            try:  # an earlier round may have damaged it already
                config = dict(json.loads(metadata.get("lora_adapter_metadata") or "{}"))
            except (ValueError, TypeError):
                config = {}
            field = one_of(rng, ["unet.lora_alpha", "unet.alpha_pattern", "unet.rank_pattern", "unet.r"])
            config[field] = one_of(rng, [odd_value(rng), {"([a-z0-9_]+\\.?)+X": 4}, {"down_blocks.[": 2},
                                         {"^mid_block.attentions.0.to_q$": float("inf")}])
            metadata["lora_adapter_metadata"] = one_of(rng, [json.dumps(config), "{not json", "[1, 2]", "null"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)


def test_malformed_lora_files(tmp_path, lora_and_unet):
    good, unet = lora_and_unet
    rng = random.Random(SEED + 1)
    for i in range(CASES):
        path = tmp_path / f"case-{i}.safetensors"
        broken_lora(rng, good, path)

        def read(path=path, i=i):
            load_lora(path, unet=unet, name=f"case{i}")
            assert all(torch.isfinite(p).all() for n, p in unet.named_parameters() if f".case{i}" in n), \
                "a non-finite LoRA was loaded"

        check_outcome(f"LoRA case {i}", read, path)


# ----------------------------------------------------------------------------- model folders

def broken_model_folder(rng: random.Random, out: Path) -> tuple[Path, str]:
    """A copy of the tiny model whose UNet or VAE config.json (or model_index.json) is damaged; weights linked."""
    shutil.copytree(TINY, out, symlinks=True, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in TINY.rglob("*.safetensors"):
        (out / weights.relative_to(TINY)).symlink_to(weights)
    file = out / one_of(rng, ["unet/config.json", "vae/config.json", "model_index.json"])
    config = json.loads(file.read_text())
    kind = rng.randrange(4)
    if kind == 0:
        file.write_bytes(one_of(rng, [b"", b"[1, 2]", b"{", b"\xff\xfe{}", b"null", b"[" * 5000 + b"]" * 5000]))
        return file, "whole"
    for _ in range(rng.randint(1, 3)):
        key = one_of(rng, sorted(config))
        config[key] = odd_value(rng) if kind < 3 else one_of(rng, [100000, [100000] * 3, 0, -4, [32] * 20])
    file.write_text(json.dumps(config))
    return file, "field"


def test_malformed_model_folders(tmp_path):
    rng = random.Random(SEED + 2)
    for i in range(CASES):
        file, _ = broken_model_folder(rng, tmp_path / f"case-{i}")
        folder = file.parent if file.name == "config.json" else file.parent

        def read(root=tmp_path / f"case-{i}"):
            detect(root)
            model_image_size(root)
            load_unet(root)
            load_vae(root)

        check_outcome(f"model folder case {i} ({file.relative_to(tmp_path)})", read, file)
        assert folder.exists()


# ----------------------------------------------------------------------------- images, zips, subject.json

def png_bytes(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (rng.randint(1, 80), rng.randint(1, 80)), (rng.randrange(256), 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def broken_image(rng: random.Random) -> bytes:
    raw = bytearray(png_bytes(rng))
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(raw[: rng.randrange(len(raw))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if kind == 2:  # the IHDR size claims a huge picture (a decompression bomb)
        raw[16:24] = struct.pack(">II", rng.randint(20000, 2**31 - 1), rng.randint(20000, 2**31 - 1))
        return bytes(raw)
    return rng.randbytes(rng.randint(0, 200))


def test_malformed_images_and_subject_files(tmp_path):
    rng = random.Random(SEED + 3)
    for i in range(CASES):
        subject = tmp_path / f"subject-{i}"
        subject.mkdir()
        (subject / "good.png").write_bytes(png_bytes(rng))
        (subject / "bad.png").write_bytes(broken_image(rng))
        settings = {"token": "rraj", "class_noun": "person"}
        if rng.random() < 0.5:
            settings[one_of(rng, ["token", "class_noun", "instance_prompt", "validation_prompts"])] = odd_value(rng)
        text = one_of(rng, [json.dumps(settings), json.dumps(settings), "[1]", "{", "\xff"])
        (subject / "subject.json").write_bytes(text.encode("utf-8", "surrogatepass"))

        def read(subject=subject):
            found = load_subject(subject)
            load_images(found.images, 64)

        check_outcome(f"subject case {i}", read, None, allowed=(DataError,))


def test_malformed_class_image_zips(tmp_path):
    rng = random.Random(SEED + 4)
    for i in range(CASES // 2):
        path = tmp_path / f"prior-{i}.zip"
        with zipfile.ZipFile(path, "w", one_of(rng, [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as archive:
            for j in range(rng.randint(1, 4)):
                archive.writestr(one_of(rng, [f"a/{j}.png", f"../{j}.png", f"/abs/{j}.png", f".{j}.png"]),
                                 png_bytes(rng))
        raw = bytearray(path.read_bytes())
        for _ in range(rng.randint(0, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        path.write_bytes(bytes(raw[: len(raw) if rng.random() < 0.7 else rng.randrange(len(raw))]))
        check_outcome(f"zip case {i}", lambda path=path: unpack_class_images(path), path)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "temporary folder left"


# ----------------------------------------------------------------------------- the command lines

def run_main(main, argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_command_lines_say_one_line_for_broken_files(tmp_path, capsys, lora_and_unet):
    rng = random.Random(SEED + 5)
    good, _ = lora_and_unet
    for i in range(6):
        lora = tmp_path / f"lora-{i}.safetensors"
        broken_lora(rng, good, lora)
        if lora.stat().st_size and rng.random() < 0.3:
            lora.write_bytes(broken_safetensors(rng))
        before = lora.read_bytes()
        code, err = run_main(sample_script.main, ["--lora", str(lora), "--steps", "1", "--prompt", "x",
                                                  "--out", str(tmp_path / "out")], capsys)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
        if code != 0:  # some damage leaves a LoRA that still loads and samples
            assert code == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: "), \
                f"FUZZ_SEED={SEED}, LoRA case {i}: {err}"
            assert lora.name in lines[0], f"FUZZ_SEED={SEED}: {err}"
        assert lora.read_bytes() == before
    for i in range(3):
        subject = tmp_path / f"subject-{i}"
        shutil.copytree(REPO / "data" / "raj", subject)
        (subject / "subject.json").write_bytes(one_of(rng, [b"[1]", b"{", b"\xff\xfe", b'{"token": 5}']))
        code, err = run_main(train_script.main, ["--subject", str(subject), "--out", str(tmp_path / "runs"),
                                                 "--steps", "1"], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "subject.json" in lines[0], f"FUZZ_SEED={SEED}: {err}"
