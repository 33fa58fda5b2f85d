"""train.py --method pivotal (minidream.methods.pivotal): the UNet's LoRA and a new word train in one
run; the word freezes after --embedding-steps, bit for bit, under both optimizers, and a resumed run
freezes at the same step; diffusers' load_textual_inversion reads the word file and encodes prompts
as minidream does; sample.py --lora RUN draws with both files."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from minidream.config import EMBEDDING_FILE, LORA_FILE, TrainConfig
from minidream.formats.models import load_model
from minidream.methods.pivotal import Pivotal, embedding_path
from minidream.methods.textual_inversion import initial_vectors
from minidream.optim import set_lr
from minidream.text import encode_text
from minidream.toy.tiny import write_tiny_sdxl
from _train import interrupted_then_resumed, train_like_cli as train
from tests.test_distributed import write_subject

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "weights/tiny-sdxl")
EMBED_TOL = 1e-6  # the same ops in the same order: only summation order may differ

sys.path.insert(0, str(ROOT))
import sample  # noqa: E402  (the CLI scripts at the repo root)
import train as train_cli  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("pivotal") / "tiny-sdxl", seed=3, dtype=torch.float32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pivotal-runs")
    write_subject(root)
    return root


def config(root, out, **overrides) -> TrainConfig:
    """6 steps, a checkpoint every 2, the word frozen after step 3 (between two checkpoints)."""
    return TrainConfig(**dict(subject=str(root / "raj"), model=TINY, out=str(root / out), method="pivotal",
                              steps=6, embedding_steps=3, save_every=2, keep_checkpoints=0, log_every=1,
                              validate_every=0, views_per_image=1, num_class_images=2, class_steps=2,
                              class_dir=str(root / "class-images"), score=False) | overrides)


def losses(run: Path) -> list[str]:
    """loss.csv's rows without their last column, the step's wall time."""
    return [row.rsplit(",", 1)[0] for row in (run / "loss.csv").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(root):
    return train(config(root, "a"))


def test_a_run_trains_the_adapters_and_the_word_and_writes_both(uninterrupted):
    run = uninterrupted
    lora, word = load_file(run / LORA_FILE), load_file(run / EMBEDDING_FILE)
    assert lora and all(k.startswith("unet.") for k in lora)  # UNet adapters only
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    assert {k: tuple(v.shape) for k, v in word.items()} == {"clip_l": (1, 64), "clip_g": (1, 128)}
    model = load_model(TINY)  # the word started as "person"
    start = initial_vectors(model.text.tokenizer, model.text.text_encoder, "person", 1)
    assert not torch.equal(word["clip_l"], start)
    assert json.loads((run / "config.json").read_text())["prior"] is True  # the adapters keep the prior term
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step-00000{i}{end}" for i in (2, 4, 6) for end in
                           ("-embeddings.safetensors", ".pt", ".safetensors")]
    # the word froze after step 3: what step 4 saved is what the run ends with, bit for bit
    words = {i: load_file(run / "checkpoints" / f"step-00000{i}-embeddings.safetensors") for i in (2, 4, 6)}
    assert all(torch.equal(words[4][k], words[6][k]) and torch.equal(word[k], words[6][k]) for k in word)
    assert not torch.equal(words[2]["clip_l"], words[4]["clip_l"])  # step 3 still moved it
    adapters = {i: load_file(run / "checkpoints" / f"step-00000{i}.safetensors") for i in (4, 6)}
    assert any(not torch.equal(adapters[4][k], adapters[6][k]) for k in adapters[4])  # the LoRA went on


def test_the_closing_hint_names_the_run_folder_and_the_word(root, capsys):
    train(config(root, "hint", steps=3, save_every=1, keep_checkpoints=1))
    out = capsys.readouterr().out
    assert "164,352 lora parameters + 192 embedding values (1 x (64 + 128) for <rraj>)" in out
    (run,) = (root / "hint").glob("raj-2*")
    assert f'try it: python sample.py --lora {run} --prompt "a photo of <rraj> person"\n' in out
    # --keep-checkpoints 1: the word files of deleted checkpoints go too
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000003-embeddings.safetensors", "step-000003.pt", "step-000003.safetensors"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_the_word_freezes_bit_for_bit_while_the_lora_trains(folder, optimizer):
    cfg = TrainConfig(method="pivotal", optimizer=optimizer, lr=1e-2, embedding_lr=1e-1, embedding_steps=2,
                      weight_decay=0.1, gradient_checkpointing=False, lora_targets="attn")
    method = Pivotal(load_model(folder), cfg, "rraj", "person")
    optimizer, name = method.make_optimizer()
    assert name == cfg.optimizer
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    assert base_lrs == [1e-2, 1e-1]
    word = method.word.parameters()
    g = torch.Generator().manual_seed(0)
    history = []
    for step in range(4):
        set_lr(optimizer, step, base_lrs, "constant", 0, 4)  # as the loop does: the rate comes back each step
        for p in method.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        history.append(([w.detach().clone() for w in word], [p.detach().clone() for p in method.parameters()]))
    (w1, p1), (w2, p2), (w3, p3), (w4, p4) = history
    assert all(not torch.equal(a, b) for a, b in zip(w1, w2))  # update 2 moved the word
    assert all(torch.equal(a, b) and torch.equal(b, c) for a, b, c in zip(w2, w3, w4))  # 3 and 4 did not
    lora_moved = lambda x, y: any(not torch.equal(a, b) for a, b in zip(x[:-2], y[:-2]))  # noqa: E731
    assert lora_moved(p2, p3) and lora_moved(p3, p4)
    assert optimizer.param_groups[-1]["lr"] == 0.0 and optimizer.param_groups[0]["lr"] == 1e-2


def test_resume_across_the_freeze_reproduces_the_uninterrupted_run(root, uninterrupted, monkeypatch):
    """Stopped at step 2 (a checkpoint), resumed: the word freezes after step 3 as in one go."""
    run = interrupted_then_resumed(config(root, "b"), monkeypatch, stop_in_step=2)
    assert losses(run) == losses(uninterrupted)
    for name in (LORA_FILE, EMBEDDING_FILE):
        ours, theirs = load_file(run / name), load_file(uninterrupted / name)
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_diffusers_reads_the_word_and_encodes_prompts_as_minidream(folder, tmp_path):
    model = load_model(folder)
    method = Pivotal(model, TrainConfig(method="pivotal", num_vectors=2, embedding_lr=1e-3,
                                        gradient_checkpointing=False, lora_targets="attn"), "rraj", "person")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained
        for p in method.word.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert method.save(tmp_path / LORA_FILE, step=5) == tmp_path  # the run folder: sample.py --lora RUN
    assert embedding_path(tmp_path / LORA_FILE) == tmp_path / EMBEDDING_FILE
    assert embedding_path(tmp_path / "step-000500.safetensors") == tmp_path / "step-000500-embeddings.safetensors"
    tensors = load_file(tmp_path / EMBEDDING_FILE)

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    pipe.load_textual_inversion(tensors["clip_l"], token="<rraj>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="<rraj>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of rraj person at the beach"
    with torch.no_grad():
        theirs, _, pooled_theirs, _ = pipe.encode_prompt("a photo of <rraj> person at the beach", device="cpu",
                                                         do_classifier_free_guidance=False)
        model.text.text_encoder.eval(), model.text.text_encoder_2.eval()
        ours, pooled_ours = encode_text(model.text, [method.prompt(prompt)])
    assert method.prompt(prompt) == "a photo of <rraj> <rraj>_1 person at the beach"
    for a, b in ((ours, theirs), (pooled_ours, pooled_theirs)):
        assert a.shape == b.shape and (a - b).abs().max().item() <= EMBED_TOL * b.abs().max().item()
    without, _ = encode_text(model.text, ["a photo of person at the beach"])  # guards the comparison
    assert (without - theirs).abs().max() > 1e-2


def test_sample_lora_run_folder_draws_with_the_word_too(uninterrupted, tmp_path):
    def draw(*flags) -> np.ndarray:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert sample.main([*flags, "--model", TINY, "--prompt", "a photo of <rraj> person", "--steps", "2",
                            "--out", str(out), "--no-progress"]) == 0
        (image,) = out.glob("*/000-*.png")
        return Image.open(image)

    both = draw("--lora", str(uninterrupted))
    assert both.text["embeddings"] == str(uninterrupted / EMBEDDING_FILE)
    lora_only = draw("--lora", str(uninterrupted / LORA_FILE))
    assert np.abs(np.asarray(both, dtype=int) - np.asarray(lora_only, dtype=int)).max() > 0
    given_twice = draw("--lora", str(uninterrupted), "--embedding", str(uninterrupted))  # the word loads once
    assert np.array_equal(np.asarray(given_twice), np.asarray(both))


@pytest.mark.parametrize("argv, message", [
    (["--train-text-encoder"], "--train-text-encoder does not go with --method pivotal"),
    (["--embedding-lr", "0"], "--embedding-lr must be in (0, 1]"),
    (["--embedding-steps", "-1"], "--embedding-steps must be >= 0"),
])
def test_settings_pivotal_tuning_cannot_use_are_one_line_errors(root, tmp_path, capsys, argv, message):
    base = ["--subject", str(root / "raj"), "--model", TINY, "--out", str(tmp_path), "--method", "pivotal"]
    assert train_cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # failed before a run folder was made
