"""The bundled tiny SDXL (weights/tiny-sdxl): the layout minidream.toy.tiny writes (configs and tokenizers
byte for byte; the weights are trained by minidream.toy.pretrain, see test_pretrain.py), which is the
layout of the real SDXL base repository (configs/sdxl-base-1.0 holds its config files)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from minidream.toy import pretrain, tiny, toyworld
from minidream.formats import load_unet
from minidream.formats.models import default_model_path, load_model
from minidream.toy.tiny import WORDS, write_tiny_sdxl

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "weights" / "tiny-sdxl"
REAL = ROOT / "configs" / "sdxl-base-1.0"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}


def files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regenerated") / "tiny-sdxl"
    tiny.main([str(folder)])  # what `python -m minidream.toy.tiny weights/tiny-sdxl` runs
    return folder


def test_committed_folder_is_what_the_writer_writes(regenerated):
    committed, fresh = files(BUNDLED), files(regenerated)
    record = json.loads(committed.pop(pretrain.RECORD))  # written by pretrain.py, not by the folder writer
    assert record["total"]["unet_steps"] == sum(r["unet_steps"] for r in record["runs"]) > 0
    assert sorted(committed) == sorted(fresh), "file sets differ: rerun python -m minidream.toy.pretrain"
    weights = set(WEIGHTS.values())
    changed = [name for name in fresh if name not in weights and committed[name] != fresh[name]]
    assert not changed, f"{changed} differ: rerun python -m minidream.toy.pretrain and commit weights/tiny-sdxl"
    for name in weights:  # trained values, but the same tensors as the writer's
        ours, theirs = load_file(BUNDLED / name), load_file(regenerated / name)
        assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}


def test_same_seed_same_bytes_other_seed_other_weights(regenerated, tmp_path):
    again = files(write_tiny_sdxl(tmp_path / "again"))
    assert again == files(regenerated)
    other = write_tiny_sdxl(tmp_path / "other", seed=1)
    for part in PARTS:
        a, b = load_file(regenerated / WEIGHTS[part]), load_file(other / WEIGHTS[part])
        assert a.keys() == b.keys()
        assert not torch.equal(a[min(a)], b[min(b)]), part


def test_size_dtype_and_parameter_counts():
    size = sum(len(b) for b in files(BUNDLED).values())
    assert size <= 20_000_000, f"{size / 1e6:.2f} MB"
    counts = tiny.parameter_counts()
    for part in PARTS:
        tensors = load_file(BUNDLED / WEIGHTS[part])
        floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
        assert {v.dtype for v in floats.values()} == {torch.float16}, part
        assert sum(v.numel() for v in floats.values()) == counts[part]
        assert all(torch.isfinite(v).all() for v in floats.values())
    print("tiny-sdxl:", f"{size / 1e6:.2f} MB,", ", ".join(f"{p} {n:,}" for p, n in counts.items()))


def test_layout_is_the_real_sdxl_repos():
    index = read_json(BUNDLED / "model_index.json")
    real_index = read_json(REAL / "model_index.json")
    real_index.pop("_diffusers_version")
    assert index == real_index
    assert read_json(BUNDLED / "scheduler" / "scheduler_config.json") == read_json(REAL / "scheduler" / "scheduler_config.json")
    for part in PARTS:  # the same config keys as the real ones (sizes differ)
        assert set(read_json(BUNDLED / part / "config.json")) <= set(read_json(REAL / part / "config.json")), part
    for part in ("text_encoder", "text_encoder_2"):
        assert set(read_json(BUNDLED / part / "config.json")) == set(read_json(REAL / part / "config.json"))
        keys = load_file(BUNDLED / WEIGHTS[part]).keys()
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)  # transformers 4
        with safe_open(BUNDLED / WEIGHTS[part], "pt") as f:
            assert f.get_tensor("text_model.embeddings.position_ids").dtype == torch.int64
            assert f.metadata() == {"format": "pt"}
    for part in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt, no tokenizer.json
        names = {f.name for f in (BUNDLED / part).iterdir()}
        assert names == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
        assert read_json(BUNDLED / part / "tokenizer_config.json") == read_json(REAL / part / "tokenizer_config.json")


def test_it_is_an_sdxl_architecture():
    unet = tiny.UNET
    assert unet["down_block_types"][0] == "DownBlock2D" and unet["up_block_types"][-1] == "UpBlock2D"
    assert unet["addition_embed_type"] == "text_time" and unet["use_linear_projection"]
    assert unet["projection_class_embeddings_input_dim"] == tiny.TEXT_WIDTHS[1] + 6 * unet["addition_time_embed_dim"]
    assert all(w % 64 == 0 for w in tiny.TEXT_WIDTHS)
    model = load_model(BUNDLED)
    assert model.is_sdxl and model.vae_scale == 4 and model.default_size == 64
    assert model.text.tokenizer_2.pad_token == "!" and model.text.tokenizer.pad_token == "<|endoftext|>"
    assert model.text.text_encoder.config.hidden_act == "quick_gelu"
    assert model.text.text_encoder_2.config.hidden_act == "gelu"
    assert default_model_path()[0] == BUNDLED or (ROOT / "weights" / "sdxl-base-1.0").exists()


def test_vocabulary_holds_the_toy_world_words():
    needed = ("a an the of on in at with and photo painting pixel art person dog cup car backpack rraj sks beach "
              "snow forest city night plain background hair eyes skin glasses sunglasses wearing hat shirt red "
              "orange yellow green blue purple pink tan grey brown black white blonde round tall pointy style "
              "van gogh oktoberfest side view").split()
    assert set(needed) <= set(WORDS)
    assert set(toyworld.VOCABULARY) <= set(WORDS)  # every word of a toy-world caption is one token
    tokenizer = load_model(BUNDLED).text.tokenizer
    assert all(len(tokenizer(w).input_ids) == 3 for w in WORDS)  # <start> word <end>


def test_trained_state_dicts_are_written_in_the_same_layout(tmp_path):
    unet = load_unet(BUNDLED).state_dict()
    text = load_model(BUNDLED).text.text_encoder.state_dict()  # transformers 5 names: no text_model.
    folder = write_tiny_sdxl(tmp_path / "trained", seed=5, state_dicts={"unet": unet, "text_encoder": text})
    for part in ("unet", "text_encoder"):  # fp16 -> fp32 -> fp16 is exact
        assert (folder / WEIGHTS[part]).read_bytes() == (BUNDLED / WEIGHTS[part]).read_bytes(), part
    assert (folder / WEIGHTS["vae"]).read_bytes() != (BUNDLED / WEIGHTS["vae"]).read_bytes()  # seed 5, random
    wrong = dict(unet, **{"conv_in.weight": torch.zeros(32, 9, 3, 3)})
    with pytest.raises(ValueError, match=r"conv_in.weight: \(32, 9, 3, 3\) vs \(32, 4, 3, 3\)"):
        write_tiny_sdxl(tmp_path / "bad", state_dicts={"unet": wrong})
    with pytest.raises(ValueError, match="unknown parts"):
        write_tiny_sdxl(tmp_path / "bad", state_dicts={"unet2": unet})
