"""The benchmark harness (benchmarks/harness.py): interleaving, medians, RESULTS.md sections.

The benchmarks themselves are not part of the test run (minutes each); this checks only the
bookkeeping every benchmark relies on, in milliseconds.
"""

import pytest

from benchmarks import harness


def test_interleave_runs_warmup_then_alternates_cases():
    calls = []

    def case(name):
        def run():
            calls.append(name)
            return {"s": float(len(calls))}
        return run

    runs = harness.interleave({"ours": case("ours"), "ref": case("ref")}, repeats=3, warmup=1, log=lambda _: None)
    assert calls == ["ours", "ref"] * 4  # one uncounted warm-up round, then 3 counted rounds
    assert [r["s"] for r in runs["ours"]] == [3.0, 5.0, 7.0]
    assert [r["s"] for r in runs["ref"]] == [4.0, 6.0, 8.0]
    assert harness.median(runs["ours"], "s") == 5.0
    assert harness.spread(runs["ref"], "s") == "4.00..8.00"


def test_speed_words_read_the_printed_ratio():
    assert harness.speed_words(0.94) == "minidream 6% faster"
    assert harness.speed_words(1.064) == "minidream 6% slower"  # printed as 1.06
    assert harness.speed_words(0.999) == "the same time"


def test_write_section_replaces_only_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    harness.write_section("a", "## A\nfirst", results)
    harness.write_section("b", "## B\nkept", results)
    harness.write_section("a", "## A\nsecond", results)
    text = results.read_text()
    assert text.startswith(harness.HEADER)
    assert "second" in text and "first" not in text and "kept" in text
    assert text.count("<!-- benchmark:a begin -->") == 1
    assert text.index("## A") < text.index("## B")  # a re-run keeps the section in its place


def test_markdown_table_formats_floats():
    table = harness.markdown_table(["case", "s"], [["ours", 1.23456], ["ref", 2]])
    assert table.splitlines() == ["| case | s |", "|---|---|", "| ours | 1.235 |", "| ref | 2 |"]


def test_run_child_returns_last_json_line_and_wall_time():
    code = "import json; print('noise'); print(json.dumps({'x': 1, 'peak': 0.5}))"
    figures = harness.run_child(["-c", code])
    assert figures["x"] == 1 and figures["peak"] == 0.5 and figures["wall_s"] > 0
    with pytest.raises(RuntimeError, match="exit 3"):
        harness.run_child(["-c", "import sys; sys.exit(3)"])


def test_peak_rss_is_this_process():
    code = ("import json; from benchmarks.harness import peak_rss_gib; before = peak_rss_gib(); "
            "b = bytearray(300 * 2**20); print(json.dumps({'before': before, 'after': peak_rss_gib()}))")
    figures = harness.run_child(["-c", code], env={"PYTHONPATH": str(harness.RESULTS.parent.parent)})
    assert figures["after"] - figures["before"] > 0.25  # the 300 MiB bytearray shows up


def test_paired_ratio_cancels_load_shared_by_a_round():
    # round 2 ran on a busy machine: both sides 10x slower; their ratio is unchanged
    ours = [{"s": 0.9}, {"s": 9.0}, {"s": 0.9}]
    ref = [{"s": 1.0}, {"s": 10.0}, {"s": 1.0}]
    assert harness.paired_ratio(ours, ref, "s") == pytest.approx(0.9)


def test_noise_note_flags_only_wide_spreads():
    quiet = {"ours": [{"s": 1.0}, {"s": 1.1}], "ref": [{"s": 2.0}, {"s": 2.2}]}
    assert harness.noise_note(quiet, "s") == ""
    busy = {"ours": [{"s": 1.0}, {"s": 3.0}], "ref": [{"s": 2.0}, {"s": 2.2}]}
    assert "ours max/min 3.00" in harness.noise_note(busy, "s") and "ref" not in harness.noise_note(busy, "s")
