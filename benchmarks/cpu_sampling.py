"""e. sample.py on the bundled tiny model (CPU): the thread policy against torch's default threads.

Each case is a whole `python sample.py` process (one 30-step 64 px image with classifier-free
guidance, `--no-progress`), as a user runs it:

    default        no flag: sample.py's thread policy (config.default_cpu_threads: 1 for tiny models)
    one-thread     --cpu-threads 1
    torch-default  --cpu-threads N, N = torch.get_num_threads() of a fresh process (its default)

"process s" is the process's whole life (Python start, imports, loading, sampling, writing);
"sampling s" is what sample.py reports for generating and writing the image. Ratios are
default / torch-default, round by round (benchmarks/harness.py). The tiny model's ops are so small
that splitting each over several threads costs more than the arithmetic, and on a busy machine
threads also wait for each other. OMP_WAIT_POLICY is left as a user has it (unset here).

    python -m benchmarks.cpu_sampling [--repeats 5]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of rraj person"
STEPS = 30


def torch_default_threads() -> int:
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


def sample_process(extra: list[str]):
    """A case: one whole sample.py process; returns {"process_s", "sampling_s"}."""

    def run() -> dict:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompt", PROMPT, "--steps", str(STEPS),
                                   "--no-progress", "--out", out, *extra], capture_output=True, text=True, cwd=ROOT)
            process_s = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"sample.py {' '.join(extra)} failed:\n{done.stderr[-2000:]}")
        sampling = re.search(r"wrote 1 image\(s\) and a grid in ([\d.]+) s", done.stdout)
        return {"process_s": process_s, "sampling_s": float(sampling.group(1))}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # No passive_waiting() here: this measures what a user sees, with torch's own OpenMP settings.
    threads = torch_default_threads()
    cases = {"default": sample_process([]), "one-thread": sample_process(["--cpu-threads", "1"]),
             "torch-default": sample_process(["--cpu-threads", str(threads)])}
    results = harness.interleave(cases, repeats=args.repeats)
    rows = [[name, harness.median(runs, "process_s"), harness.spread(runs, "process_s"),
             harness.median(runs, "sampling_s"), harness.spread(runs, "sampling_s")]
            for name, runs in results.items()]
    ratio = harness.paired_ratio(results["default"], results["torch-default"], "process_s")
    sampling_ratio = harness.paired_ratio(results["default"], results["torch-default"], "sampling_s")
    body = f"""## e. sample.py on the bundled tiny model: thread policy vs torch's default threads (CPU)

Command: `{harness.command_line()}`

{harness.machine_lines(harness.machine())}

Config: `python sample.py --prompt "{PROMPT}" --steps {STEPS} --no-progress` on weights/tiny-sdxl (one
64 px image, DDIM, guidance 5), a fresh process per run; torch's default here is {threads} threads.
1 warm-up round, then medians of {args.repeats} interleaved rounds.

{harness.markdown_table(["case", "process s", "process min..max", "sampling s", "sampling min..max"], rows)}

Summary: the default (one thread for the tiny model) against torch's default threads: whole process ratio
{ratio:.2f}, sampling ratio {sampling_ratio:.2f}{harness.noise_note(results, "sampling_s")}
"""
    print(body)
    harness.write_section("e-cpu-sampling", body)


if __name__ == "__main__":
    main()
