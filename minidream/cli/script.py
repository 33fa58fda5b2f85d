"""How train.py and sample.py end: an exit code, and for each way of failing what stderr says.

    0    done
    1    the machine: a full disk, an output folder that cannot be written, or out of memory (one line
         with a hint)
    2    the user's input: a minidream.errors.UserError, from the library or the scripts' own checks,
         or a bad flag (cli.args.Parser); one line `prog: error: ...` that names the fix
    130  Ctrl-C; 143 SIGTERM (timeout, docker stop, SLURM): a training run saves a checkpoint first
Any other exception is a bug, or a failure of the machine, and keeps its traceback.
"""

from __future__ import annotations

import errno
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable

from minidream.errors import UserError


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # for users: the message, not the source line that warned


def free_space(filename: str | None) -> str:
    """"12.3 MiB free" on the file system of `filename` (its nearest existing folder)."""
    folder = Path(filename or ".").resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_script(prog: str, command: Callable, *args, out_of_memory: str, disk_full: str = "") -> int:
    """Run `command(*args)` (parsing included) and return the script's exit code.

    out_of_memory: what to try instead; disk_full: what else to know once space is free.
    """
    warnings.formatwarning = one_line_warning
    try:
        command(*args)
    except UserError as e:
        return fail(prog, str(e), 2)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return fail(prog, f"disk full while writing {e.filename or 'a file'} ({free_space(e.filename)}); free "
                              "some space and run again" + disk_full, 1)
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and e.filename:
            return fail(prog, f"cannot write {e.filename} ({e.strerror}); choose a writable folder (--out)", 1)
        raise
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, and the CPU / MPS allocators' errors
        if "out of memory" not in str(e).lower():
            raise
        return fail(prog, f"out of memory; {out_of_memory}", 1)
    except KeyboardInterrupt as e:  # Ctrl-C, or runs.Stopped: Ctrl-C or SIGTERM once a checkpoint is saved
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n{prog}: interrupted" + (" (SIGTERM)" if signum == signal.SIGTERM else ""), file=sys.stderr)
        return 128 + signum
    return 0
