"""runs/<subject>-latest: a link to the newest finished run of a subject, which train.py sets at
the end of a run and sample.py --lora / train.py --resume accept as a run folder."""

from __future__ import annotations

import os
from pathlib import Path


def link_latest(run: Path, subject_name: str) -> Path | None:
    """Point <out>/<subject>-latest at this finished run (a relative symlink, replaced atomically),
    so that `python sample.py --lora runs/raj-latest` uses the newest result. The link is only ever
    set to a real run folder's name, never to a link (resuming through the link itself)."""
    run = run.resolve()
    link = run.parent / f"{subject_name}-latest"
    tmp = run.parent / f".{link.name}.{os.getpid()}.tmp"
    try:
        if run.name == link.name:
            raise OSError(f"{run} is named like the link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:  # a file system without symlinks, a real folder of that name
        tmp.unlink(missing_ok=True)
        print(f"note: {link} does not point at this run ({e.strerror or e}); use the run folder")
        return None
    print(f"latest run: {link} -> {run.name}")
    return link
