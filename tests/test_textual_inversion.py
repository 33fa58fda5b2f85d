"""train.py --method textual-inversion (minidream.methods.textual_inversion): only the new word's vectors
train and every other weight stays bit-identical; diffusers' StableDiffusionXLPipeline loads the
saved file with load_textual_inversion and draws the same latents as minidream; sample.py
--embedding uses it; bad files and tokens fail with a clear message."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minidream.formats.models import load_model
from minidream.optim import make_optimizer
from minidream.pipeline import sample_latents
from minidream.schedule import alphas_cumprod
from minidream.step import Batch, apply_gradients, training_step
from minidream.text import encode_text
from minidream.methods.textual_inversion import (EmbeddingFileError, TextualInversion, expand_prompt, load_embedding,
                                         name_the_word)
from minidream.toy.tiny import write_tiny_sdxl
from minidream.config import TrainConfig, TrainingError
from _train import train_like_cli as train
from tests.test_distributed import write_subject

ROOT = Path(__file__).resolve().parent.parent
LATENT_TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("ti") / "tiny-sdxl", seed=3, dtype=torch.float32)


def trained_word(model, num_vectors=1, seed=0) -> TextualInversion:
    """A TextualInversion method whose vectors hold random values (as if trained)."""
    method = TextualInversion(model, TrainConfig(method="textual-inversion", num_vectors=num_vectors, lr=1e-2,
                                                 gradient_checkpointing=False), "rraj", "person")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return method


def test_only_the_new_rows_train_and_everything_else_stays_bit_identical(folder):
    model = load_model(folder)
    everything = lambda: {f"{part}.{k}": v.clone() for part, m in
                          (("unet", model.unet), ("te1", model.text.text_encoder), ("te2", model.text.text_encoder_2))
                          for k, v in m.state_dict().items() if not k.endswith("token_embedding.vectors")}
    before = everything()
    method = TextualInversion(model, TrainConfig(method="textual-inversion", num_vectors=2, lr=1e-2,
                                                 gradient_checkpointing=True),
                              "rraj", "person")
    start = [p.detach().clone() for p in method.parameters()]
    assert [tuple(p.shape) for p in start] == [(2, 64), (2, 128)]  # 2 vectors for each SDXL encoder
    person = model.text.tokenizer("person", add_special_tokens=False).input_ids
    assert torch.equal(start[0][1], model.text.text_encoder.get_input_embeddings().weight[person[0]])  # init word
    # weight decay 0.01: AdamW would shrink every row it saw; it sees only the new ones
    optimizer, _ = make_optimizer(method.param_groups(), "adamw", lr=1e-2, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    prompts = [method.prompt("a photo of rraj person"), "a photo of person"]
    assert prompts[0] == "a photo of <rraj> <rraj>_1 person"
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        batch = Batch(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g),
                      torch.tensor([300, 700]), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), torch.tensor([0, 0]), 2)
        training_step(model.unet, batch, lambda: encode_text(model.text, prompts), alphas_cumprod(model.schedule),
                      scaler=scaler)
        apply_gradients(optimizer, method.parameters(), scaler, max_grad_norm=1.0)
    after = everything()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not torch.equal(p, s) for p, s in zip(method.parameters(), start))
    assert {id(p) for p in optimizer.state} == {id(p) for p in method.parameters()}  # Adam holds 2 x (2 x 192) values


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_diffusers_loads_the_file_and_draws_the_same_latents(folder, tmp_path, num_vectors):
    method = trained_word(load_model(folder), num_vectors)
    file = method.save(tmp_path / "learned_embeds.safetensors", step=10)
    tensors = load_file(file)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (num_vectors, 64), "clip_g": (num_vectors, 128)}
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["token"] == "<rraj>"

    prompt = "a photo of <rraj> person at the beach"
    ours = load_model(folder)
    token, n = load_embedding(ours.text, file)
    assert (token, n) == ("<rraj>", num_vectors)
    options = dict(steps=4, seed=5, guidance_scale=5.0, progress=False)
    latents = sample_latents(ours, expand_prompt(prompt, token, n), **options)

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(tensors["clip_l"], token="<rraj>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="<rraj>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs = pipe(prompt=prompt, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                  generator=torch.Generator().manual_seed(5)).images
    err = ((latents - theirs).abs().max() / theirs.abs().max()).item()
    without = sample_latents(ours, "a photo of person at the beach", **options)  # guards the comparison
    print(f"{num_vectors} vector(s): latents rel err vs diffusers {err:.1e}; "
          f"vs the prompt without the word {((latents - without).abs().max() / without.abs().max()).item():.2f}")
    assert err <= LATENT_TOL
    assert ((latents - without).abs().max() / without.abs().max()).item() > 1e-2


def test_train_then_sample_with_the_embedding(tmp_path, capsys):
    import sys

    write_subject(tmp_path)
    run = train(TrainConfig(subject=str(tmp_path / "raj"), model=str(ROOT / "weights/tiny-sdxl"), out=str(tmp_path),
                            method="textual-inversion", steps=3, validate_every=0, save_every=3, log_every=1,
                            views_per_image=1))
    printed = capsys.readouterr().out
    assert "textual inversion trains without class images" in printed and "384 embedding values" not in printed
    assert "192 embedding values (1 x (64 + 128) for <rraj>)" in printed
    file = run / "learned_embeds.safetensors"
    assert file.stat().st_size < 2000  # (64 + 128) fp32 values and a header
    assert json.loads((run / "config.json").read_text())["prior"] is False
    assert not (tmp_path / "class-images").exists()  # no class images were made

    sys.path.insert(0, str(ROOT))
    import sample

    out = tmp_path / "samples"
    assert sample.main(["--embedding", str(run), "--prompt", "a photo of <rraj> person", "--steps", "2",  # the run
                        "--out", str(out), "--no-progress"]) == 0  # folder stands for its embedding file
    (first,) = out.iterdir()
    (image,) = first.glob("000-*.png")
    assert Image.open(image).text["embeddings"] == str(file)  # recorded, to draw the image again
    # the same file under another name (FILE:TOKEN), and an error for a missing file
    assert sample.main(["--embedding", f"{file}:<me>", "--prompt", "a photo of <me>", "--steps", "1",
                        "--out", str(out), "--no-progress"]) == 0
    assert len(list(out.iterdir())) == 2  # each call in its own folder
    assert sample.main(["--embedding", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--out", str(out)]) == 2
    assert "nope.safetensors not found; give --embedding FILE.safetensors[:TOKEN]" in capsys.readouterr().err


def test_the_closing_hint_names_the_trained_prompt(tmp_path, capsys):
    """The 'try it' line spells the word as it was trained: here after the noun, with its 3 vectors (not as
    the subject's validation prompts, which put it before the noun)."""
    write_subject(tmp_path)
    train(TrainConfig(subject=str(tmp_path / "raj"), model=str(ROOT / "weights/tiny-sdxl"), out=str(tmp_path / "runs"),
                      method="textual-inversion", instance_prompt="a photo of person rraj", num_vectors=3, steps=1,
                      validate_every=0, views_per_image=1, score=False))
    assert '--prompt "a photo of person <rraj> <rraj>_1 <rraj>_2"\n' in capsys.readouterr().out


def test_bad_words_and_files_fail_clearly(folder, tmp_path):
    model = load_model(folder)
    with pytest.raises(EmbeddingFileError, match="'rraj' is already a word"):
        TextualInversion(model, TrainConfig(method="textual-inversion", placeholder_token="rraj"), "rraj", "person")
    save_file({"<dog>": torch.zeros(1, 64)}, str(tmp_path / "sd15.safetensors"))  # one-encoder (SD 1.x) layout
    with pytest.raises(EmbeddingFileError, match="one-encoder model.*2 text encoder"):
        load_embedding(load_model(folder).text, tmp_path / "sd15.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "real.safetensors"))
    with pytest.raises(EmbeddingFileError, match="768 wide but this text encoder's tokens are 64 wide"):
        load_embedding(load_model(folder).text, tmp_path / "real.safetensors", token="<x>")
    text = load_model(folder).text
    trained_word(load_model(folder)).save(tmp_path / "w.safetensors", step=1)
    load_embedding(text, tmp_path / "w.safetensors")
    with pytest.raises(EmbeddingFileError, match="already a word"):
        load_embedding(text, tmp_path / "w.safetensors")  # twice
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbeddingFileError, match="cannot read"):
        load_embedding(text, tmp_path / "junk.safetensors")


def test_prompts_name_the_new_word():
    assert name_the_word("a painting of rraj person, rraj smiling", "rraj", "<rraj>") == \
        "a painting of <rraj> person, <rraj> smiling"
    assert name_the_word("a photo of <rraj> person", "rraj", "<rraj>") == "a photo of <rraj> person"  # already it
    assert name_the_word("a photo of rrajx", "rraj", "<rraj>") == "a photo of rrajx"  # another word
    assert name_the_word("a photo of rraj", "rraj", "<r>", 2) == "a photo of <r> <r>_1"
    assert expand_prompt("<rraj> and <rraj>", "<rraj>", 3) == "<rraj> <rraj>_1 <rraj>_2 and <rraj> <rraj>_1 <rraj>_2"


@pytest.mark.parametrize("setting, message", [
    ({"instance_prompt": "a photo of a person"}, "names neither 'rraj' nor '<rraj>'"),
    ({"train_text_encoder": True}, "--train-text-encoder does not go with --method textual-inversion"),
])
def test_settings_textual_inversion_cannot_use_fail_before_loading(tmp_path, setting, message):
    write_subject(tmp_path)
    with pytest.raises(TrainingError, match=message):
        train(TrainConfig(subject=str(tmp_path / "raj"), model=str(ROOT / "weights/tiny-sdxl"), out=str(tmp_path / "runs"),
                          method="textual-inversion", **setting))
    assert not (tmp_path / "runs").exists()  # failed before a run folder (or the model) was made
