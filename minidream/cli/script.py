"""How train.py and sample.py end: an exit code, and for each way of failing what stderr says.

    0    done
    1    the machine: a full disk, or out of memory (one line with a hint)
    2    the user's input: a minidream.errors.UserError, from the library or the scripts' own checks,
         or a bad flag (cli.args.Parser); one line `prog: error: ...` that names the fix
    130  Ctrl-C
Any other exception is a bug, or a failure of the machine, and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
import warnings
from typing import Callable

from minidream.errors import UserError


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # for users: the message, not the source line that warned


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_script(prog: str, command: Callable[[], None], *, out_of_memory: str, disk_full: str = "") -> int:
    """Run `command` (parsing included) and return the script's exit code.

    out_of_memory: what to try instead; disk_full: what else to know once space is free.
    """
    warnings.formatwarning = one_line_warning
    try:
        command()
    except UserError as e:
        return fail(prog, str(e), 2)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        return fail(prog, f"disk full while writing {e.filename or 'a file'}; free some space and run again"
                          + disk_full, 1)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, and the CPU / MPS allocators' errors
        if "out of memory" not in str(e).lower():
            raise
        return fail(prog, f"out of memory; {out_of_memory}", 1)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
