"""minidream.text against diffusers' StableDiffusionXLPipeline.encode_prompt on a tiny random SDXL.

The tiny model (minidream.toy.tiny) is written in the layout real SDXL repos have (vocab.json + merges.txt
tokenizers, transformers-4 `text_model.*` keys with a saved position_ids buffer); diffusers' side
loads them with transformers' own from_pretrained, minidream's side with its own loader.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from minidream.formats.models import SDXL_REPO, TokenizerNotFoundError, load_text_encoders
from minidream.text import encode_prompt, sdxl_time_ids
from minidream.toy.tiny import WORDS, write_model_index, write_tiny_sdxl
from minidream.toy.vocab import write_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-6
LONG = "a photo of rraj person wearing a red hat at the beach " * 8  # > 77 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(folder):
    return load_text_encoders(folder)


@pytest.fixture(scope="module")
def reference(folder):
    """diffusers' SDXL pipeline holding only the text parts, loaded by transformers."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
    )


def reference_embeddings(pipe, prompts, negative=None, guidance=True, n=1, force_zeros=True):
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    with torch.no_grad():
        ctx, uctx, pooled, upooled = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=n,
            do_classifier_free_guidance=guidance, negative_prompt=negative)
    return ctx, pooled, uctx, upooled


def assert_same(ours_out, ref_out):
    for name, a, b in zip(("context", "pooled", "uncond_context", "uncond_pooled"), ours_out, ref_out):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
        assert (a - b).abs().max().item() <= TOL, f"{name} differs by {(a - b).abs().max().item():.3g}"


CASES = {
    "one prompt": (["a photo of rraj person"], None, {}),
    "batch, no negative": (["a photo of rraj person", "a painting of person at the beach with sunglasses"], None, {}),
    "batch, one negative": (["a photo of rraj person", "a dog"], "blurry, low quality", {}),
    "batch, negatives": (["a photo of rraj person", "a dog"], ["ugly", "bad sketch"], {}),
    "explicit empty negative": (["a photo of rraj person"], "", {}),
    "no zeros for empty": (["a photo of rraj person", "unknown xyzzy words 42"], None, {"force_zeros": False}),
    "images per prompt": (["a photo of rraj person", "a cat"], "blurry", {"n": 3}),
    "no guidance": (["a photo of rraj person"], None, {"guidance": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_encode_prompt_matches_diffusers(ours, reference, case):
    prompts, negative, kw = CASES[case]
    ref = reference_embeddings(reference, prompts, negative, **kw)
    mine = encode_prompt(ours, prompts, negative, guidance=kw.get("guidance", True),
                         force_zeros_for_empty_prompt=kw.get("force_zeros", True),
                         num_images_per_prompt=kw.get("n", 1))
    assert_same(mine, ref)
    batch = len(prompts) * kw.get("n", 1)
    assert mine[0].shape == (batch, 77, 64 + 128) and mine[1].shape == (batch, 128)
    if negative is None and kw.get("guidance", True):  # zeros exactly when asked for
        assert (mine[2].abs().max() == 0) == kw.get("force_zeros", True)


def test_explicit_empty_negative_is_encoded_not_zero(ours):
    _, _, uctx, upooled = encode_prompt(ours, "a photo of rraj person", "")
    assert uctx.abs().max() > 0 and upooled.abs().max() > 0


def test_long_prompt_is_truncated_with_a_warning_like_diffusers(ours, reference):
    assert len(ours.tokenizer(LONG).input_ids) > 77
    with pytest.warns(UserWarning, match="dropped"):
        mine = encode_prompt(ours, [LONG, "a cat"], LONG)
    with pytest.warns(UserWarning, match="dropped") as caught:
        encode_prompt(ours, LONG * 40, guidance=False)
    assert len(str(caught[0].message)) < 250  # a few words of what is dropped, not thousands of characters
    assert_same(mine, reference_embeddings(reference, [LONG, "a cat"], LONG))
    # Truncation keeps the first 75 tokens: the same as the prompt cut short by hand, encoded in a batch
    # of the same shape (a batch of 1 may take another matmul path and round differently).
    cut = ours.tokenizer.decode(ours.tokenizer(LONG).input_ids[1:76]).replace("</w>", " ")
    with pytest.warns(UserWarning, match="dropped"):  # the negative prompt is cut again
        by_hand = encode_prompt(ours, [cut, "a cat"], LONG)
    assert torch.equal(mine[0][:1], by_hand[0][:1])


def test_bad_negative_batch_is_refused(ours):
    with pytest.raises(ValueError, match="one per prompt"):
        encode_prompt(ours, ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="no prompt"):
        encode_prompt(ours, [])


def test_loaded_encoders_hold_the_files_weights_frozen(folder, ours):
    for enc, sub in ((ours.text_encoder, "text_encoder"), (ours.text_encoder_2, "text_encoder_2")):
        file = load_file(str(folder / sub / "model.safetensors"))
        mine = enc.state_dict()
        for key, value in file.items():
            if key.endswith("position_ids"):
                continue
            key = key if key in mine else key.removeprefix("text_model.")
            assert torch.equal(mine[key], value), key
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
        [(name, positions)] = list(enc.named_buffers())  # rebuilt, not left on the meta device
        assert name.endswith("position_ids") and torch.equal(positions, torch.arange(77)[None])
    assert ours.text_encoder.config.hidden_act == "quick_gelu" and ours.text_encoder_2.config.hidden_act == "gelu"


def test_missing_tokenizer_names_the_files_and_where_to_get_them(folder, tmp_path):
    for sub in ("text_encoder", "text_encoder_2"):  # weights without any tokenizer
        shutil.copytree(folder / sub, tmp_path / "model" / sub)
    write_model_index(tmp_path / "model", ("text_encoder", "text_encoder_2"))
    with pytest.raises(TokenizerNotFoundError) as err:
        load_text_encoders(tmp_path / "model")
    for needed in ("--tokenizer", "tokenizer/", "tokenizer_2/", "vocab.json", "merges.txt", SDXL_REPO):
        assert needed in str(err.value)
    write_clip_tokenizer(tmp_path / "tok" / "tokenizer", WORDS)  # tokenizer_2/ still missing
    with pytest.raises(TokenizerNotFoundError, match=str(tmp_path / "tok")):
        load_text_encoders(tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    shutil.copytree(folder / "tokenizer_2", tmp_path / "tok" / "tokenizer_2")
    given = load_text_encoders(tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    assert torch.equal(encode_prompt(given, "a photo")[0], encode_prompt(load_text_encoders(folder), "a photo")[0])


def test_folder_saved_by_transformers5(folder, ours, tmp_path):
    # save_pretrained of today's transformers: tokenizer.json only, CLIPTextModel keys unprefixed.
    for sub in ("tokenizer", "tokenizer_2"):
        getattr(ours, sub).save_pretrained(tmp_path / sub)
    ours.text_encoder.save_pretrained(tmp_path / "text_encoder")
    ours.text_encoder_2.save_pretrained(tmp_path / "text_encoder_2")
    shutil.copy(folder / "model_index.json", tmp_path)
    resaved = load_text_encoders(tmp_path)
    prompt = "a photo of rraj person"
    for x, y in zip(encode_prompt(resaved, prompt, "ugly"), encode_prompt(ours, prompt, "ugly")):
        assert torch.equal(x, y)


def test_fp16_loading(folder, ours):
    half = load_text_encoders(folder, dtype=torch.float16)
    assert half.text_encoder_2.dtype == torch.float16
    assert half.text_encoder_2.text_model.embeddings.position_ids.dtype == torch.int64
    ctx, pooled, _, _ = encode_prompt(half, "a photo of rraj person")
    ref_ctx, ref_pooled, _, _ = encode_prompt(ours, "a photo of rraj person")
    assert ctx.dtype == pooled.dtype == torch.float16
    assert torch.allclose(ctx.float(), ref_ctx, atol=2e-2) and torch.allclose(pooled.float(), ref_pooled, atol=2e-2)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="not a model"):
        load_text_encoders(tmp_path)


def test_sd1_conditioning_matches_diffusers(folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    for sub in ("tokenizer", "text_encoder"):
        shutil.copytree(folder / sub, tmp_path / sub)
    write_model_index(tmp_path, ("tokenizer", "text_encoder"), pipeline="StableDiffusionPipeline")
    ours = load_text_encoders(tmp_path)
    assert ours.text_encoder_2 is None
    pipe = StableDiffusionPipeline(
        vae=None, unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(tmp_path / "text_encoder"))
    prompts = ["a photo of rraj person", "a cat"]
    for negative in (None, ["ugly", "blurry"]):
        with torch.no_grad():
            ctx, uctx = pipe.encode_prompt(prompts, torch.device("cpu"), 2, True, negative)
        mine = encode_prompt(ours, prompts, negative, num_images_per_prompt=2)
        assert_same(mine, (ctx, None, uctx, None))


def test_time_ids():
    ids = sdxl_time_ids((1024, 768), (0, 32), (1024, 1024))
    assert ids.shape == (6,) and ids.tolist() == [1024, 768, 0, 32, 1024, 1024]
    batch = sdxl_time_ids([(512, 512), (900, 1200)], [(0, 0), (10, 20)], (1024, 1024))
    assert batch.shape == (2, 6)
    assert batch.tolist() == [[512, 512, 0, 0, 1024, 1024], [900, 1200, 10, 20, 1024, 1024]]
    assert sdxl_time_ids((1, 2), (3, 4), (5, 6), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="crop_top_left"):
        sdxl_time_ids((1024, 1024), (0, 0, 0), (1024, 1024))


def test_tiny_vocab_keeps_prompt_words_whole_and_unknown_words_tokenizable(ours):
    tok = ours.tokenizer
    for word in WORDS:
        assert len(tok(word).input_ids) == 3, word  # <start> word </end>
    ids = tok("zq, naïve 日本").input_ids
    assert tok.unk_token_id not in ids[1:-1]  # every byte has a symbol: nothing is unknown
    assert ours.tokenizer_2.pad_token == "!" and ours.tokenizer.pad_token == "<|endoftext|>"
