"""The toy experiments' plumbing, without training: --only replaces one section of the results file
and keeps the rest, and section 8 (context leak) trains the variants it says and reports them."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from minidream.toy import context_experiment as cx
from minidream.toy import methods_experiment as mx
from minidream.toy import toyworld as tw
from minidream.toy.toy_experiments import LOG_MARKER, Settings, command, main, results_text, section_key

HEAD = "## DreamBooth in the toy world (measured on CPU)\n\n`python -m minidream.toy.toy_experiments`: 60 min.\n\n"
LOG = f"{LOG_MARKER}\n### What was tried\n\nPretraining. Hand-written notes.\n"


def section(title: str, body: str, notes: str = "") -> str:
    return f"### {title}\n\n{body}\n\n(10 s)\n{notes}"


def old_file() -> str:
    """A results file as a full run writes it: head, Targets, sections 1..7 (the notes of the old
    layout after the last one), then the kept log."""
    parts = [section("Targets", "| measure | ... |")] + [
        section(f"{n}. Section {n}", f"| table {n} |") for n in ("1", "2-3", "4", "5", "6")]
    parts.append(section("7. Section 7", "| table 7 |", "\n- demo (prior on): trained in 144 s (raj-1)\n"))
    return HEAD + "\n".join(parts) + "\n" + LOG


def test_section_keys():
    assert section_key("### 2-3. The demo run, with and without prior preservation") == "2-3"
    assert section_key("8. Context leak: one shared background, captions and masks") == "8"
    assert section_key("### Targets") == "Targets"


def test_only_adds_a_new_section_and_keeps_everything_else():
    old = old_file()
    new = section("8. Context leak", "| leak table |\n\nTarget: ...", "- plain: trained in 99 s (raj-city-1)\n")
    text = results_text("## a new head that must not replace the old one\n\n", {"8": new}, old, only=True)
    assert text.startswith(HEAD) and text.endswith("\n\n" + LOG)  # head and the hand-written log kept
    before, after = text.split(LOG_MARKER)
    assert before.index("### 7. Section 7") < before.index("- demo (prior on)") < before.index("### 8. Context leak")
    assert new in before and "| table 7 |" in before and "### Targets\n\n| measure | ... |" in before
    assert text.replace(new + "\n", "") == old  # nothing else changed: taking section 8 out gives the old file
    # --only again replaces section 8 in place, and the file does not grow
    again = section("8. Context leak: one shared background", "| leak table, rerun |")
    text2 = results_text(HEAD, {"8": again}, text, only=True)
    assert "| leak table |" not in text2 and again in text2 and text2.count("### 8.") == 1
    assert text2.replace(again + "\n", "") == old


def test_only_replaces_a_middle_section_in_its_place():
    old = old_file()
    text = results_text(HEAD, {"4": section("4. How many instance images", "| new table 4 |")}, old, only=True)
    assert "| table 4 |" not in text and "| new table 4 |" in text
    order = [text.index(f"### {k}") for k in ("Targets", "1.", "2-3.", "4.", "5.", "6.", "7.")]
    assert order == sorted(order) and text.endswith(LOG)
    assert text.replace("| new table 4 |", "| table 4 |").replace("### 4. How many instance images", "### 4. Section 4") == old


def test_a_full_run_rewrites_every_section_and_keeps_only_the_log():
    new_head = "## DreamBooth in the toy world (measured on CPU)\n\n`...`: 1.0 min (sections done so far: 1 of 8)\n\n"
    text = results_text(new_head, {"1": section("1. Base", "| new 1 |")}, old_file())
    assert text == new_head + section("1. Base", "| new 1 |") + "\n" + LOG
    assert results_text(HEAD, {"1": section("1. Base", "| x |")}) == HEAD + section("1. Base", "| x |")
    # --only with no results file yet: the new head, the chosen section
    assert results_text(HEAD, {"8": section("8. Leak", "| y |")}, "", only=True) == HEAD + section("8. Leak", "| y |")


def test_only_is_a_setting_that_the_command_repeats(tmp_path):
    assert command(Settings(only="8", samples=64)) == "python -m minidream.toy.toy_experiments --samples 64 --only 8"
    with pytest.raises(SystemExit, match="2-7 need 1 and 2"):  # section 5 samples the LoRA that 2-3 trains
        main(["--only", "5", "--results", str(tmp_path / "r.md"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="the sections are"):
        main(["--only", "12", "--results", str(tmp_path / "r.md"), "--out", str(tmp_path)])
    assert not (tmp_path / "r.md").exists()


class FakeExperiments:
    """What context_leak uses of toy_experiments.Experiments, with canned figures instead of training:
    a model is the tuple of its LoRAs, a LoRA the run's subject folder name + its unmasked_weight."""

    LEAK = {"raj-city": 0.9, "raj-city-captions": 0.3, "raj-city-masks": 0.6, "raj-city-captions-masks": 0.2}

    def __init__(self, out: Path):
        self.out, self.judge, self.trained, self.tag = out, "judge", [], None

    def train(self, name, folder, **overrides):
        self.trained.append((Path(folder).name, overrides))
        assert (Path(folder) / "subject.json").is_file()
        return (Path(folder).name, overrides.get("unmasked_weight"))

    def model(self, loras=()):
        return tuple(path for path, _ in loras)

    def images(self, model, prompt):
        assert prompt == "a photo of rraj person"
        return model

    def subject_rows(self, model):
        lower = 0.1 if model and model[0][0].endswith("masks") and model[0][1] == 0.0 else 0.0
        return {"instance": 0.8 - lower, "edits": 0.4}

    def drift(self, model):
        return {"drift": 0.0}


def test_context_leak_trains_each_variant_and_reports_the_leak(tmp_path, monkeypatch):
    e = FakeExperiments(tmp_path)
    monkeypatch.setattr(cx.te, "shows", lambda judge, images, wanted: (
        FakeExperiments.LEAK[images[0][0]] if images else 0.2) if wanted == {"context": "city"} else 1 / 0)
    table = cx.context_leak(e, 0.1)
    assert [name for name, _ in e.trained] == ["raj-city", "raj-city-captions"] + ["raj-city-masks"] * 3 + [
        "raj-city-captions-masks"]
    assert [o for _, o in e.trained] == [{}, {}] + [{"unmasked_weight": w} for w in cx.UNMASKED_WEIGHTS] + [
        {"unmasked_weight": 0.1}]  # the weight goes to the mask runs only
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    rows = {c[0]: c[1:] for c in cells}
    assert len(rows) == len(cells) == 2 + 1 + 6  # header, rule, floor, 6 LoRAs (no demo row: no e.lora)
    assert rows["base model (no LoRA): the floor"] == ["", "", "", "20%", ""]
    assert rows["data/raj-city: plain"] == ["80%", "40%", "0%", "90%", ""]
    assert rows["data/raj-city: captions naming the background"] == ["80%", "40%", "0%", "30%", "yes"]
    assert rows["data/raj-city: masks, unmasked_weight 0.0"] == ["70%", "40%", "0%", "60%", "no"]  # look -10
    assert rows["data/raj-city: masks, unmasked_weight 0.1 (the default)"][3:] == ["60%", "no"]
    assert rows["data/raj-city: masks, unmasked_weight 0.3"][3:] == ["60%", "no"]
    assert rows["data/raj-city: captions + masks, unmasked_weight 0.1 (the default)"][3:] == ["20%", "yes"]
    assert "Target: captions or masks cut the plain run's leak at least in half (to <= 45%)" in table
    assert "captions naming the background yes, masks, unmasked_weight 0.0 no" in table
    assert "goal" not in table.lower()  # tests/test_layout.py keeps bookkeeping words out of benchmarks/
    # the folders are the toy world's data/raj-city with captions and masks as asked
    folder = tmp_path / "subjects" / "raj-city-captions-masks"
    assert (folder / "rraj_0.txt").read_text() == "a photo of rraj person in the city"
    assert np.asarray(Image.open(folder / "rraj_0-masklabel.png")).max() == 255
    assert not list((tmp_path / "subjects" / "raj-city").glob("*.txt"))
    # a default outside the sweep gets a masks row of its own
    e = FakeExperiments(tmp_path)
    cx.context_leak(e, 0.5)
    assert [o.get("unmasked_weight") for _, o in e.trained] == [None, None, 0.0, 0.1, 0.3, 0.5, 0.5]
    assert tw.SHARED_CONTEXT == "city"


def test_methods_section_measures_each_variant_once_and_reuses_what_it_stored(tmp_path, monkeypatch):
    """Section 11 keeps each variant's figures in OUT/methods/NAME.json keyed by its settings: a second
    run (another process's, or the assembling one) reuses them; other settings measure again."""
    measured = []

    def fake_measure(e, name):
        measured.append(name)
        return {"look": 0.5, "edits": 0.25, "drift": 0.0, "fields": 0.75, "prompt": f"a photo of {name}",
                "bytes": 2000, "seconds": 10.0, "run": "r", "files": ["x.safetensors"]}

    monkeypatch.setattr(mx, "measure", fake_measure)
    monkeypatch.setattr(mx, "judged", lambda e, model, name: {"look": 0.0, "edits": 0.0, "drift": 0.0,
                                                              "fields": 0.94, "prompt": "p"})
    e = SimpleNamespace(out=tmp_path, s=Settings(samples=4), model=lambda: None, tag=None)
    table = mx.methods_now(e, "lora,dora-6e-3")
    assert measured == ["lora", "dora-6e-3"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["LoRA (the demo)", "DoRA, lr 6e-3"]
    assert "| 2.0 KB | 10 | 50% | 25% | 0% | 75% |" in rows[0] and "94% of fields right" in table
    mx.methods_now(e, "lora,dora-6e-3")
    assert measured == ["lora", "dora-6e-3"]  # stored: nothing measured again
    e.s = Settings(samples=8)
    mx.methods_now(e, "lora")
    assert measured == ["lora", "dora-6e-3", "lora"]  # other settings: measured again
    assert set(mx.VARIANTS) >= {"lora", "lora-ema-0.99", "pivotal-5e-3", "ti-after"}
