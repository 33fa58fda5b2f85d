"""Repository hygiene: the README's test command is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    test_cmds = [c for c in commands if "pytest" in c]
    assert len(test_cmds) == 1, f"README must show exactly one test command, found {test_cmds}"
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [ln for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert test_cmds[0] in ci_lines, ".ci/run must run the README's test command verbatim"


def test_requirements_keep_torch_a_range():
    # A pinned torch would replace a user's CUDA build; a range keeps it.
    req = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch>=", req, re.M)
    assert not re.search(r"^(diffusers|peft)", req, re.M), "diffusers/peft are test-only"
