"""A `.zip` of class images given as --class-dir: checked, then unpacked once beside itself (`prior.zip` ->
`prior/`), so that the core reads a plain folder. train.py unpacks before training starts."""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
import zlib
from pathlib import Path

from minidream.data import IMAGE_SUFFIXES, DataError

# A zip bomb inflates a few MB to GBs: the members' sizes are checked before any is read.
ZIP_LIMITS = {"images": 100_000, "bytes/image": 2**28, "bytes": 2**34, "inflation": 100}


def unpack_class_images(archive_path) -> Path:
    """The folder beside `archive_path` holding its images (flattened: archives often hold one top folder)."""
    archive_path = Path(archive_path)
    if not archive_path.is_file():
        raise DataError(f"class image archive {archive_path} does not exist")
    folder = archive_path.with_suffix("")
    if folder.exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.unpacking")
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = [m for m in archive.infolist() if Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
                       and not Path(m.filename).name.startswith(".")]
            check_archive(archive_path, members)
            tmp.mkdir(parents=True, exist_ok=True)
            for m in members:  # only the file name is kept: no member can write outside tmp
                (tmp / Path(m.filename).name).write_bytes(archive.read(m))
        tmp.rename(folder)
    except DataError:  # check_archive's refusal (a UserError is a ValueError too)
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, OSError) as e:
        # EINVAL: a member's offset points before the file's start (a damaged directory)
        if not isinstance(e, OSError) or e.errno == errno.EINVAL:
            raise DataError(f"{archive_path} is not a valid zip archive ({e}); unpack it and pass the folder") from None
        if not folder.is_dir():  # else another process (a torchrun rank) unpacked it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_archive(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip whose images would unpack to more than ZIP_LIMITS allow, before reading any. Photos barely
    compress: inflation is the unpacked size over the packed one, of each image (from 64 KB) and of all (from 1 MB)."""
    sizes, packed = [m.file_size for m in members], [m.compress_size for m in members]
    ratios = [s / max(p, 2**16) for s, p in zip(sizes, packed)] + [sum(sizes) / max(sum(packed), 2**20)]
    found = {"images": len(members), "bytes/image": max([0, *sizes]), "bytes": sum(sizes), "inflation": max(ratios)}
    over = [f"{k} {v:,.0f} > {ZIP_LIMITS[k]:,}" for k, v in found.items() if v > ZIP_LIMITS[k]]
    if over:
        raise DataError(f"{path} would unpack to {', '.join(over)} (a zip bomb?); unpack it and pass the folder")
