"""A new user's path, as the README writes it: train.py twice, then the README's follow-up sample.py
command exactly as written; Ctrl-C in the middle of a run (exit 130, a checkpoint to resume from).

Each run is a subprocess in a fresh folder holding data/ (a link to the repository's), so that the
README's relative paths (data/raj, runs/...) mean what they mean for a user.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--steps", "2", "--num-class-images", "2", "--class-steps", "2", "--validate-every", "0",
         "--save-every", "0", "--views-per-image", "1"]
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def user_folder(tmp_path: Path) -> Path:
    (tmp_path / "data").symlink_to(ROOT / "data", target_is_directory=True)
    return tmp_path


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def readme_command(start: str) -> list[str]:
    """The README's command line that starts with `start`, with python and the script made runnable here."""
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(start)]
    words = shlex.split(line)
    assert words[0] == "python" and words[1].endswith(".py")
    return [sys.executable, str(ROOT / words[1]), *words[2:]]


def test_two_trainings_then_the_readme_follow_up_command(tmp_path):
    cwd = user_folder(tmp_path)
    first = script("train.py", "--subject", "data/raj", *SHORT, cwd=cwd)
    assert first.returncode == 0, first.stderr
    # the run scores itself with the toy judge; two steps cannot teach the subject, so the judge never sees it
    assert re.search(r"^subject look 0% \| drift 0% \| edit kept 0%  \(toy judge; ", first.stdout, re.M), first.stdout
    (scored,) = (cwd / "runs").glob("raj-2*/score.json")
    assert json.loads(scored.read_text())["line"] == "subject look 0% | drift 0% | edit kept 0%"
    second = script("train.py", "--subject", "data/raj", *SHORT, "--seed", "1", "--no-score", cwd=cwd)
    assert "subject look" not in second.stdout
    assert second.returncode == 0, second.stderr
    runs = sorted(p for p in (cwd / "runs").iterdir() if p.name.startswith("raj-2"))
    assert len(runs) == 2
    latest = cwd / "runs" / "raj-latest"
    assert latest.is_symlink() and latest.resolve() == runs[1].resolve()  # the newest finished run

    follow_up = readme_command("python sample.py --lora runs/raj-latest")
    done = subprocess.run(follow_up, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (folder,) = (cwd / "runs" / "samples").iterdir()
    image = Image.open(next(folder.glob("000-*.png")))
    assert image.text["loras"] == "runs/raj-latest/pytorch_lora_weights.safetensors:1"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_exits_128_plus_it_with_a_checkpoint_to_resume(tmp_path, signum, code):
    """Ctrl-C, or SIGTERM as timeout, docker stop and SLURM send it: a checkpoint, then exit 128 + signum."""
    cwd = user_folder(tmp_path)
    train = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--subject", "data/raj", *SHORT,
                              "--steps", "2000", "--log-every", "1", "--no-prior", "--no-score"], cwd=cwd, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in train.stdout:
        if re.match(r"step +3/2000", line):
            break
    train.send_signal(signum)
    out, err = train.communicate(timeout=300)
    assert train.returncode == code, err
    (run,) = [p for p in (cwd / "runs").iterdir() if p.name.startswith("raj-")]
    assert "continue with: python train.py --resume " + str(Path("runs") / run.name) in out
    assert "Traceback" not in err and "interrupted" in err
    assert list((run / "checkpoints").glob("step-*.pt"))
    assert not (run / "pytorch_lora_weights.safetensors").exists() and not (cwd / "runs" / "raj-latest").exists()

    resumed = script("train.py", "--resume", str(run), "--steps", "8", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert (cwd / "runs" / "raj-latest").resolve() == run.resolve()


def test_resume_through_the_latest_link_then_sample_from_it(tmp_path):
    """The steps of a user who trains, then trains the newest run longer through runs/raj-latest and
    samples from it: the link still points at the run folder afterwards (never at itself)."""
    cwd = user_folder(tmp_path)
    first = script("train.py", "--subject", "data/raj", *SHORT, "--steps", "3", "--no-prior",
                   "--save-every", "3", "--no-score", cwd=cwd)
    assert first.returncode == 0, first.stderr
    latest = cwd / "runs" / "raj-latest"
    run = latest.resolve()
    resumed = script("train.py", "--resume", "runs/raj-latest", "--steps", "5", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "Traceback" not in resumed.stderr
    assert latest.is_symlink() and latest.readlink() == Path(run.name)
    sampled = script("sample.py", "--lora", "runs/raj-latest", "--prompt", "a photo of rraj person",
                     "--steps", "2", "--no-progress", cwd=cwd)
    assert sampled.returncode == 0, sampled.stderr
