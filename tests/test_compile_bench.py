"""benchmarks/compile_step.py --quick: the tiny model's LoRA training step, eager and after
`unet.compile()`, each in a fresh process with an empty inductor cache. Compiling keeps the UNet's
state_dict and LoRA keys (checkpoints and LoRA files stay as they are) and computes the same
losses. Slow: a cold inductor compile of the tiny UNet's training graph takes about 2 minutes on a
shared 2-core CPU (benchmarks/RESULTS.md, section g)."""

import argparse
import statistics

import pytest

from benchmarks import compile_step

pytestmark = pytest.mark.slow


def test_compiled_training_step_keeps_keys_and_losses():
    args = argparse.Namespace(quick=True, steps=2, mid_steps=2, images=1)
    train, sample = compile_step.run_all(args, log=lambda _: None)
    eager, compiled = train["tiny", "off", "eager", "new"], train["tiny", "off", "compiled", "new"]
    assert sample == {} and "error" not in eager
    assert "error" not in compiled, compiled["error"]
    assert compiled["lora_keys_same"] and compiled["state_keys_same"] and compiled["lora_tensors"] > 0
    assert len(compiled["losses"]) == len(eager["losses"]) == 3  # 1 warm-up + 2 timed steps
    assert compile_step.rel_diff(compiled["losses"], eager["losses"]) < 1e-5
    assert compiled["lora_sum"] == pytest.approx(eager["lora_sum"], rel=1e-5)  # the same updates
    assert compiled["graphs"] >= 1 and statistics.median(compiled["step_s"]) > 0
    table = compile_step.report(args, {"cpu": "test"}, train, sample)
    assert "| tiny | off | compiled | cold |" in table
