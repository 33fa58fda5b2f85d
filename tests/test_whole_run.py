"""The whole-run benchmark's pieces that run without diffusers' script: recipes, both command lines,
the torchvision guard, and the in-process script runner (the runs themselves are benchmarks/)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import harness, whole_run
from benchmarks.reference_script import GUARDED_FAKE, UNGUARDED_FAKE, reference_args, reference_losses
from minidream.cli.args import config_from_args, train_parser

ROOT = Path(__file__).resolve().parent.parent


def args_for(models="tiny,mid", checkpointing="off,on", steps=None, class_images=None, protocols="matched"):
    return argparse.Namespace(models=models, checkpointing=checkpointing, steps=steps, class_images=class_images,
                              protocols=protocols)


def test_recipes_cover_every_model_and_checkpointing_mode():
    chosen = whole_run.recipes(args_for())
    assert [(r.name, r.gradient_checkpointing) for r in chosen] == [
        ("tiny", False), ("tiny", True), ("mid", False), ("mid", True)]
    (only,) = whole_run.recipes(args_for(models="mid", checkpointing="on", steps=3, class_images=2))
    assert (only.steps, only.class_images, only.save_every, only.resolution) == (3, 2, 1, 256)


def test_minidream_command_line_is_a_valid_train_py_call(tmp_path):
    for r in whole_run.recipes(args_for(models="tiny")):
        argv = whole_run.minidream_args(tmp_path, r)
        assert argv[0].endswith("train.py")
        cfg = config_from_args(train_parser("train").parse_args(argv[1:]))
        assert (cfg.steps, cfg.rank, cfg.lora_targets, cfg.prior, cfg.num_class_images) == (
            r.steps, r.rank, "attn", True, r.class_images)
        assert cfg.gradient_checkpointing is r.gradient_checkpointing


def test_protocols_give_matched_class_image_settings_or_the_presets(tmp_path):
    matched, defaults = whole_run.recipes(args_for(models="mid", checkpointing="off", protocols="matched,defaults"))
    assert (matched.protocol, defaults.protocol) == ("matched", "defaults")
    parse = lambda r: config_from_args(train_parser("train").parse_args(whole_run.minidream_args(tmp_path, r)[1:]))
    cfg = parse(matched)
    assert (cfg.sampler, cfg.class_steps, cfg.class_batch) == ("ddim", whole_run.CLASS_STEPS,
                                                                whole_run.REFERENCE_CLASS_BATCH)
    cfg = parse(defaults)
    assert (cfg.sampler, cfg.class_steps, cfg.class_batch) == (None, None, None)  # the presets fill them


def test_reference_command_line_matches_the_recipe(tmp_path):
    off, on = whole_run.recipes(args_for(models="tiny"))
    argv = reference_args(tmp_path / "off", off, whole_run.SUBJECT, "a photo of rraj person", "a photo of person", 0)
    value = {flag: argv[argv.index(flag) + 1] for flag in ("--max_train_steps", "--rank", "--num_class_images")}
    assert value == {"--max_train_steps": str(off.steps), "--rank": str(off.rank),
                     "--num_class_images": str(off.class_images)}
    assert "--with_prior_preservation" in argv and "--gradient_checkpointing" not in argv
    assert sorted(p.name for p in (tmp_path / "off" / "instance").iterdir()) == sorted(
        p.name for p in whole_run.SUBJECT.glob("*.png"))  # photos only: the script opens every file
    assert "--gradient_checkpointing" in reference_args(tmp_path / "on", on, whole_run.SUBJECT, "a", "b", 0)


def test_torchvision_guard_wraps_only_the_two_unguarded_registrations():
    source = ('@torch.library.register_fake("torchvision::nms")\ndef meta_nms(): pass\n'
              '    @torch.library.register_fake("torchvision::roi_align")\n'
              '@torch.library.register_fake("torchvision::qnms")\ndef meta_qnms(): pass\n')
    guarded, count = UNGUARDED_FAKE.subn(GUARDED_FAKE, source)
    assert count == 2
    assert '@(torch.library.register_fake("torchvision::nms") if torchvision.extension._has_ops()' in guarded
    assert '    @torch.library.register_fake("torchvision::roi_align")' in guarded  # inside `if`: left alone
    assert UNGUARDED_FAKE.subn(GUARDED_FAKE, guarded)[1] == 0  # a second pass changes nothing


def test_reference_losses_take_each_steps_last_progress_bar_drawing(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_text("Steps:   0%|  | 0/2 [00:00<?, ?it/s]"
                   "\rSteps:  50%|# | 1/2 [00:01<00:01, loss=0.5, lr=1]"
                   "\rSteps:  50%|# | 1/2 [00:01<00:01, loss=0.25, lr=1]"
                   "\nSteps: 100%|##| 2/2 [00:02<00:00, loss=0.125]\n")
    assert reference_losses(log) == [0.25, 0.125]


def test_run_script_tees_stderr_and_reports_its_peak(tmp_path):
    script, log = tmp_path / "script.py", tmp_path / "stderr.log"
    script.write_text("import sys\nprint('to stderr', file=sys.stderr)\nassert sys.argv[1:] == ['a', 'b']\n")
    code = f"from benchmarks import harness; harness.run_script({str(log)!r}, {str(script)!r}, ['a', 'b'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "to stderr" in done.stderr and "to stderr" in log.read_text()
    assert json.loads(done.stdout.splitlines()[-1])["peak_rss_gib"] > 0
    child = harness.run_child(["-m", "benchmarks.whole_run", "--child", str(log), str(script), "a", "b"])
    assert child["peak_rss_gib"] > 0
