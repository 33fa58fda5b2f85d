"""benchmarks.gpu_check on the CPU: the same code a CUDA user runs, on the bundled tiny model's shapes."""

import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_small_on_cpu_prints_the_report_and_passes_its_checks():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--small", "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| minidream |" in out and "| diffusers + peft |" in out
    assert "step time ratio minidream / diffusers:" in out
    assert "planner's predicted step peak" in out and "30 DDIM steps" in out
    assert "uint8 Adam moments for 134 of 134 LoRA tensors" in out
    assert "checks: all passed" in out


def test_gpu_check_fails_when_the_lora_does_not_train(capsys):
    assert gpu_check.main(["--device", "cpu", "--small", "--steps", "1", "--lr", "0"]) == 1
    assert "checks: FAILED: the LoRA weights changed" in capsys.readouterr().out


def test_gpu_check_without_cuda_is_one_error_line(capsys):
    try:
        gpu_check.main([])
    except SystemExit as e:
        assert e.code == 2
    assert capsys.readouterr().err.strip() == ("error: no CUDA GPU here: run this on a machine with one, or pass "
                                               "--device cpu --small")


def test_gpu_check_runs_the_step_on_quantised_bases_too(capsys):
    """--base-weights int8 nf4: the 8 and 6 GB recipes' step, with the planner's prediction beside it."""
    assert gpu_check.main(["--device", "cpu", "--small", "--steps", "1", "--base-weights", "fp16", "int8", "nf4"]) == 0
    out = capsys.readouterr().out
    for base in ("int8", "nf4"):
        line = next(l for l in out.splitlines() if l.startswith(f"- --base-weights {base}:"))
        assert "s/step" in line and "planner's predicted step peak" in line
    phases = [l for l in out.splitlines() if l.startswith(("| fp16, tiles off |", "| int8, tiles 32 |", "| nf4, tiles 32 |"))]
    assert len(phases) == 9 and all("| n/a |" in l and l.endswith("| yes |") for l in phases)
    assert {l.split(" | ")[1] for l in phases} == set(gpu_check.PHASES.values())
