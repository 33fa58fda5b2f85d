"""Loading tiny SDXL-shaped checkpoints written by the tests in the layouts real ones have.

The same random weights are written as a diffusers folder (configs + safetensors, text encoders with
transformers 4's `text_model.*` names as real repos have) and as one single file under the original
SGM / LDM / OpenCLIP names. The single file is written through diffusers' own converter run
backwards (which original name becomes which diffusers name), not through minidream's renames.
"""

import ctypes
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from checkpoint_fixtures import (
    OPENCLIP, UNET, VAE, hf_v4_names, randomize, reference_models, sgm_unet_shapes, write_clip_folder,
    write_single_file,
)  # fmt: skip
from minidream import formats
from minidream.formats import checkpoint
from minidream.formats import models as model_module
from minidream.formats.checkpoint import CheckpointError
from minidream.formats.model_folder import text_encoder_state_dicts
from minidream.toy.tiny import UNET as TINY_UNET
from minidream.toy.tiny import configs as tiny_configs
from minidream.toy.tiny import write_tiny_sdxl



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SDXL (fp32) as a diffusers folder and as a single file; returns their paths and weights.

    The folder is minidream.toy.tiny's (the real SDXL repo layout); the reference models are what
    diffusers and transformers load from it; the single file is written from those through
    diffusers' converters run backwards (checkpoint_fixtures), not through minidream's renames.
    """
    root = tmp_path_factory.mktemp("tiny")
    folder = write_tiny_sdxl(root / "sdxl-tiny", seed=0, dtype=torch.float32)
    models = reference_models(folder)
    file = root / "tiny_sdxl.safetensors"
    single = write_single_file(models, file)
    return {"folder": folder, "file": file, "single": single, "models": models, "root": root}


def assert_same_weights(model, reference, dtype=torch.float32):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == dtype and torch.equal(got[k], want[k].to(dtype)), k


def test_openclip_writer_agrees_with_diffusers(tiny):
    """The single file's OpenCLIP tensors read back through diffusers' converter give te2 exactly."""
    te2 = tiny["models"]["text_encoder_2"]
    theirs = sfu.convert_open_clip_checkpoint(te2, tiny["single"], prefix=OPENCLIP)
    want = te2.state_dict()
    assert theirs.keys() == want.keys() and all(torch.equal(theirs[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# Folder and single file give the same model
# ---------------------------------------------------------------------------------------------


def test_detect(tiny):
    info = checkpoint.detect(tiny["folder"])
    assert (info.layout, info.family, info.missing) == ("diffusers", "sdxl", ())
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"} <= set(info.parts)
    info = formats.detect(tiny["file"])
    assert (info.layout, info.family) == ("single-file", "sdxl")
    assert info.parts == ("text_encoder", "text_encoder_2", "unet", "vae")
    assert formats.detect(tiny["file"]).family == formats.detect(tiny["folder"]).family == "sdxl"
    assert checkpoint.detect(tiny["folder"] / "vae").layout == "component"


def test_unet_single_file_equals_folder(tiny):
    from_folder = formats.load_unet(tiny["folder"])
    from_file = formats.load_unet(tiny["file"])
    assert_same_weights(from_folder, tiny["models"]["unet"])
    assert_same_weights(from_file, tiny["models"]["unet"])
    inferred, _ = formats.unet_weights(tiny["file"])
    stored = json.loads((tiny["folder"] / "unet" / "config.json").read_text())
    for key, value in inferred.items():  # sample_size is not in the tensors
        if key not in ("_class_name", "sample_size"):
            assert value == stored[key], key


@pytest.mark.parametrize("linear_attention", [False, True])
def test_vae_single_file_equals_folder(tiny, tmp_path, linear_attention):
    file = tiny["file"]
    if linear_attention:  # some files store the mid-block attention as linear (C, C) weights
        state = {k: (v.flatten(1) if ".attn_1." in k and v.ndim == 4 else v) for k, v in tiny["single"].items()}
        assert any(".attn_1.q.weight" in k and v.ndim == 2 for k, v in state.items())
        save_file(state, str(file := tmp_path / "linear_attention.safetensors"))
    assert_same_weights(formats.load_vae(tiny["folder"]), tiny["models"]["vae"])
    assert_same_weights(formats.load_vae(file), tiny["models"]["vae"])
    inferred, _ = formats.vae_weights(file)
    stored = json.loads((tiny["folder"] / "vae" / "config.json").read_text())
    for key, value in inferred.items():
        if key not in ("_class_name", "sample_size"):
            assert value == stored[key], key


@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_2"])
def test_text_encoders_single_file_equal_folder(tiny, part):
    reference = tiny["models"][part]
    for path in (tiny["folder"], tiny["file"]):
        model = formats.load_text_encoder(path, part)
        assert type(model) is type(reference)
        assert_same_weights(model, reference)
        position_ids = dict(model.named_buffers())[next(n for n, _ in model.named_buffers() if n.endswith("position_ids"))]
        assert position_ids.dtype == torch.int64 and torch.equal(position_ids[0], torch.arange(77))
    config, _ = formats.text_encoder_weights(tiny["file"], part)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "vocab_size", "hidden_act", "projection_dim", "eos_token_id"):  # fmt: skip
        assert config[key] == getattr(reference.config, key), key


def test_text_encoder_state_dicts_use_transformers4_names(tiny):
    for path in (tiny["folder"], tiny["file"]):
        dicts = text_encoder_state_dicts(path)
        assert set(dicts) == {"text_encoder", "text_encoder_2"}
        for part, (config, state) in dicts.items():
            want = hf_v4_names(tiny["models"][part].state_dict())
            assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


def test_transformers5_text_layout_loads_too(tiny, tmp_path):
    """A text_encoder/ saved without the `text_model.` level (transformers 5) loads the same."""
    folder = tmp_path / "v5"
    shutil.copytree(tiny["folder"], folder)
    shutil.rmtree(folder / "text_encoder")
    write_clip_folder(folder / "text_encoder", tiny["models"]["text_encoder"])
    assert not any(k.startswith("text_model.") for k in load_file(folder / "text_encoder" / "model.safetensors"))
    assert_same_weights(formats.load_text_encoder(folder, "text_encoder"), tiny["models"]["text_encoder"])


def test_known_extra_tensors_are_skipped(tiny, tmp_path):
    state = dict(tiny["single"])
    state.update({
        OPENCLIP + "logit_scale": torch.tensor(1.0), "denoiser.sigmas": torch.ones(1000),
        "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(1),
        "alphas_cumprod": torch.ones(1000), "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    })  # fmt: skip
    save_file(state, str(file := tmp_path / "extras.safetensors"))
    assert_same_weights(formats.load_unet(file), tiny["models"]["unet"])
    assert formats.detect(file).family == "sdxl"


def test_formats_load_model_on_a_single_file_equals_the_folder_model(tiny, tmp_path):
    """minidream.formats reads any path: the single file gives the folder's model, part for part,
    and a folder model takes a lone VAE file as its `vae`."""
    folder, file = tiny["folder"], tiny["file"]
    ours = model_module.load_model(folder)
    single = formats.load_model(file, tokenizer=folder)  # single files carry no tokenizer
    assert formats.load_model(folder).name == ours.name == str(folder)
    for part in ("unet", "vae"):
        assert_same_weights(getattr(single, part), getattr(ours, part))
    for part in ("text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(single.text, part), getattr(ours.text, part))
    assert single.is_sdxl and single.force_zeros_for_empty_prompt == ours.force_zeros_for_empty_prompt
    # the sample size is in no tensor: a single file gets its family's (SDXL: 1024 px / 8 per latent)
    assert formats.model_image_size(file) == single.default_size == 128 * single.vae_scale
    assert formats.model_image_size(folder) == model_module.model_image_size(folder) == ours.default_size
    vae_only = {k[len(VAE) :]: v for k, v in tiny["single"].items() if k.startswith(VAE)}
    save_file(vae_only, str(vae_file := tmp_path / "sdxl_vae.safetensors"))
    assert_same_weights(formats.load_model(folder, vae=vae_file).vae, ours.vae)


def test_the_folder_reader_refuses_a_single_file_with_one_clear_error(tiny):
    """formats/checkpoint.py and formats/models.py read folders; a file gets one CheckpointError that
    names the loader that reads it, whichever core entry point it was given to."""
    file = tiny["file"]
    calls = [lambda: checkpoint.detect(file), lambda: checkpoint.unet_weights(file),
             lambda: checkpoint.vae_weights(file), lambda: checkpoint.text_encoder_weights(file),
             lambda: model_module.load_model(file, tokenizer=tiny["folder"]),
             lambda: model_module.model_image_size(file),
             lambda: model_module.load_model(tiny["folder"], vae=file)]
    for call in calls:
        with pytest.raises(CheckpointError, match=r"is a file.*read by minidream.formats.load_model") as error:
            call()
        assert str(file) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Variants, shards, dtypes, memory
# ---------------------------------------------------------------------------------------------


def test_fp16_variant_rule(tiny, tmp_path):
    """Plain files by default, the .fp16 ones when asked, and whichever exists when only one does."""
    unet = tiny["models"]["unet"]
    other = randomize(UNet2DConditionModel(**TINY_UNET), 7).half()
    both = tmp_path / "both"
    unet.save_pretrained(both)
    other.save_pretrained(both, variant="fp16")
    assert (both / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert_same_weights(formats.load_unet(both, expect=None), unet)
    assert_same_weights(formats.load_unet(both, expect=None, variant="fp16"), other.float())
    only_fp16 = tmp_path / "only_fp16"
    other.save_pretrained(only_fp16, variant="fp16")
    assert_same_weights(formats.load_unet(only_fp16, expect=None), other.float())
    assert_same_weights(formats.load_unet(only_fp16, expect=None, dtype=torch.float16), other, torch.float16)


def test_sharded_index(tiny, tmp_path):
    unet = tiny["models"]["unet"]
    unet.save_pretrained(tmp_path / "plain", max_shard_size="200KB")
    randomize(UNet2DConditionModel(**TINY_UNET), 8).save_pretrained(tmp_path / "plain", max_shard_size="200KB", variant="fp16")
    assert len(list((tmp_path / "plain").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 3
    assert (tmp_path / "plain" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert_same_weights(formats.load_unet(tmp_path / "plain", expect=None), unet)
    fp16 = formats.load_unet(tmp_path / "plain", expect=None, variant="fp16")
    assert not torch.equal(fp16.conv_in.weight, unet.conv_in.weight)  # the other shard set was read


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_conversion_on_load(tiny, dtype):
    for path in (tiny["folder"], tiny["file"]):
        assert_same_weights(formats.load_unet(path, dtype), tiny["models"]["unet"], dtype)
        assert_same_weights(formats.load_vae(path, dtype), tiny["models"]["vae"], dtype)
        te2 = formats.load_text_encoder(path, "text_encoder_2", dtype)
        assert_same_weights(te2, tiny["models"]["text_encoder_2"], dtype)
        assert dict(te2.named_buffers())["text_model.embeddings.position_ids"].dtype == torch.int64


def _anon_rss() -> int:
    """Anonymous resident memory of this process in bytes (file-backed mmap pages excluded)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


class _PeakRss:
    """Sample anonymous RSS every millisecond in a thread; keep the peak above the start."""

    def __enter__(self):
        try:  # hand freed heap memory back to the OS first, so reuse of it cannot hide a copy
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start, self.peak, self.running = _anon_rss(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _anon_rss() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _anon_rss() - self.start)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("file_dtype,dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_loading_never_holds_a_second_copy(tmp_path, monkeypatch, file_dtype, dtype):
    """Peak extra RAM of a whole load_unet (build + stream) stays near the finished model's size
    (one tensor in flight), far from the two copies of build-on-CPU-then-copy loading."""

    def build(config):  # a 48 MB (fp32) stand-in for the UNet: 12 layers of 4 MB
        return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(12)])

    monkeypatch.setattr(checkpoint, "build_unet", build)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    state = {k: torch.randn(v.shape).to(file_dtype) for k, v in build(None).state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    del state
    model_bytes = 12 * (1024 * 1024 + 1024) * torch.finfo(dtype).bits // 8
    with _PeakRss() as rss:
        model = formats.load_unet(folder, dtype, expect=None)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model[3].weight, load_file(folder / "diffusion_pytorch_model.safetensors")["3.weight"].to(dtype))
    assert rss.peak < 1.25 * model_bytes, (rss.peak, model_bytes)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ---------------------------------------------------------------------------------------------


def test_pickle_files_are_refused(tmp_path):
    (ckpt := tmp_path / "model.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"(?s)pickle.*runs Python code.*safetensors.*save_file"):
        formats.load_unet(ckpt)
    (folder := tmp_path / "old" / "unet").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(TINY_UNET, _class_name="UNet2DConditionModel")))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin is a pickle file"):
        formats.load_unet(folder, expect=None)


def test_lora_file_says_it_is_a_lora(tmp_path):
    lora = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4),
            "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0)}  # fmt: skip
    save_file(lora, str(file := tmp_path / "subject_lora.safetensors"))
    assert formats.detect(file).layout == "lora"
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter.*not a base model.*--lora"):
        formats.load_unet(file)


def tiny_sd15_file(path):
    """A tiny SD 1.x-shaped single file: sgm/ldm UNet names (conv proj_in, no label_emb) + CLIP-L."""
    config = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}  # fmt: skip
    shapes = sgm_unet_shapes(config)
    state = {UNET + k: torch.randn(s) for k, s in shapes.items()}
    te = randomize(CLIPTextModel(CLIPTextConfig.from_dict(tiny_configs()["text_encoder"])), 4)
    state.update({"cond_stage_model.transformer." + k: v for k, v in hf_v4_names(te.state_dict()).items()})
    save_file(state, str(path))
    return config, state


def test_sd15_file_where_sdxl_expected(tmp_path):
    config, state = tiny_sd15_file(file := tmp_path / "v1-5-pruned.safetensors")
    assert formats.detect(file).family == "sd1"
    with pytest.raises(CheckpointError, match=r"is a Stable Diffusion 1.x model, but an SDXL base model was expected"):
        formats.load_unet(file)
    # asked for any family, it loads: the same tensors diffusers' converter places
    unet = formats.load_unet(file, expect=None, config=dict(config, attention_head_dim=8))
    theirs = sfu.convert_ldm_unet_checkpoint(state, config)
    ours = unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_vae_file_where_model_expected(tiny, tmp_path):
    vae_only = {k[len(VAE) :]: v for k, v in tiny["single"].items() if k.startswith(VAE)}
    save_file(vae_only, str(file := tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"is a VAE alone, not a whole model"):
        formats.load_unet(file)
    assert_same_weights(formats.load_vae(file), tiny["models"]["vae"])  # but it is a fine --vae


def _save_changed(tiny, path, drop=(), add=None):
    state = {k: v for k, v in tiny["single"].items() if k not in drop}
    state.update(add or {})
    save_file(state, str(path))
    return path


def test_missing_and_unexpected_keys_are_counted_and_named(tiny, tmp_path):
    drop = [UNET + "input_blocks.3.1.proj_in.weight", UNET + "out.2.bias"]
    file = _save_changed(tiny, tmp_path / "missing.safetensors", drop=drop)
    with pytest.raises(CheckpointError, match=r"(?s)2 tensors of the model are missing.*conv_out.bias, down_blocks.1.attentions.0.proj_in.weight"):
        formats.load_unet(file)
    extra = {UNET + "input_blocks.1.0.in_layers.9.weight": torch.zeros(3), UNET + "time_embed.5.weight": torch.zeros(3)}
    file = _save_changed(tiny, tmp_path / "unexpected.safetensors", add=extra)
    with pytest.raises(CheckpointError, match=r"2 checkpoint tensors match nothing in the model: model.diffusion_model.input_blocks.1.0"):
        formats.load_unet(file)
    file = _save_changed(tiny, tmp_path / "stray.safetensors", add={"embedding_manager.foo": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 tensors of this single file belong to no part.*embedding_manager.foo"):
        formats.load_unet(file)


def test_shape_mismatch_names_key_and_both_shapes(tiny, tmp_path):
    folder = tmp_path / "wrong_config"
    shutil.copytree(tiny["folder"] / "unet", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, in_channels=9)))
    with pytest.raises(CheckpointError, match=r"1 shape mismatches: conv_in.weight: checkpoint \(32, 4, 3, 3\) vs model \(32, 9, 3, 3\)"):
        formats.load_unet(folder)


def test_missing_folder_parts(tiny, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(tiny["folder"], folder)
    shutil.rmtree(folder / "text_encoder_2")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert checkpoint.detect(folder).missing == ("text_encoder_2",)
    with pytest.raises(CheckpointError, match=r"has no text_encoder_2/ folder.*without text_encoder_2/"):
        formats.load_text_encoder(folder, "text_encoder_2")
    with pytest.raises(CheckpointError, match=r"vae holds no weights: expected diffusion_pytorch_model.safetensors"):
        formats.load_vae(folder)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"unet has no config.json"):
        formats.load_unet(folder)
    assert_same_weights(formats.load_text_encoder(folder, "text_encoder"), tiny["models"]["text_encoder"])


def test_not_a_model(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        formats.load_unet(tmp_path / "nowhere")
    (folder := tmp_path / "weights").mkdir()
    shutil.copy(tiny["file"], folder / "mine.safetensors")
    with pytest.raises(CheckpointError, match=r"not a model folder.*holds mine.safetensors: give that file"):
        formats.load_unet(folder)
    (bad := tmp_path / "truncated.safetensors").write_bytes(tiny["file"].read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file"):
        formats.load_unet(bad)


# ---------------------------------------------------------------------------------------------
# Damaged and crafted model folders and headers: one CheckpointError naming the file, at once

BUNDLED = Path(__file__).resolve().parent.parent / "weights" / "tiny-sdxl"


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _int32_weight(folder):
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.int32)
    save_file(state, file)


DAMAGED_FOLDERS = {  # how the folder is damaged, what the error says
    "int32 weight": (_int32_weight, r"unet/diffusion_pytorch_model.safetensors: conv_in.weight is torch.int32, not "
                                    r"torch.float32"),
    "config a list": (lambda f: (f / "unet" / "config.json").write_text("[1, 2]"),
                      r"unet/config.json is not valid JSON holding an object \{\.\.\.\} \(\[1, 2\]\)"),
    "config not JSON": (lambda f: (f / "vae" / "config.json").write_text("{'a': 1"), r"vae/config.json is not valid JSON"),
    "config not UTF-8": (lambda f: (f / "text_encoder" / "config.json").write_bytes(b"{\"a\": \"\xff\"}"),
                         r"text_encoder/config.json is not valid JSON.*utf-8"),
    "model_index not JSON": (lambda f: (f / "model_index.json").write_text("{"), r"model_index.json is not valid JSON"),
    "model_index odd values": (lambda f: (f / "model_index.json").write_text('{"_class_name": 7, "unet": [], "vae": 5}'),
                               r"model_index.json does not list vae/ as \[library, class name\]"),
    "scheduler a list": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text("[]"),
                         r"scheduler_config.json is not valid JSON holding an object"),
    "absurd widths": (lambda f: _edit_json(f / "unet" / "config.json", block_out_channels=[100000, 64, 128]),
                      r"unet/config.json: block_out_channels=\[100000, 64, 128\] is no sane size \(1 to 8192"),
    "absurd depth": (lambda f: _edit_json(f / "unet" / "config.json", transformer_layers_per_block=[1, 1, 10**6]),
                     r"unet/config.json: transformer_layers_per_block=\[1, 1, 1000000\] is no sane size"),
    "absurd text width": (lambda f: _edit_json(f / "text_encoder_2" / "config.json", hidden_size=10**6),
                          r"text_encoder_2/config.json: hidden_size=1000000 is no sane size"),
    "levels": (lambda f: _edit_json(f / "vae" / "config.json", block_out_channels=[16] * 50),
               r"vae/config.json: block_out_channels=.* is no sane size"),
    "a string for sizes": (lambda f: _edit_json(f / "unet" / "config.json", block_out_channels="big"),
                           r"block_out_channels=big is no sane size"),
    "unknown key": (lambda f: _edit_json(f / "unet" / "config.json", magic=1), r"unet/config.json: UNet config has an "
                                                                               r"unknown key 'magic'"),
    "groups that do not divide": (lambda f: _edit_json(f / "vae" / "config.json", norm_num_groups=5),
                                  r"VAE from .*: its config.json builds no model \(ValueError\('num_channels \(16\) must be "
                                  r"divisible by num_groups \(5\)'\)\)"),
    "heads that do not divide": (lambda f: _edit_json(f / "text_encoder" / "config.json", num_attention_heads=7),
                                 r"text_encoder/config.json: .*not a multiple of the number of attention heads"),
    "shards outside the folder": (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../unet/diffusion_pytorch_model.safetensors"}})), r"lists shards that are "
                                                                                             r"not there: \.\./\.\./"),
}


@pytest.mark.parametrize("case", list(DAMAGED_FOLDERS))
def test_damaged_model_folder_is_one_clear_error(tmp_path, case):
    damage, message = DAMAGED_FOLDERS[case]
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED, folder)
    damage(folder)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as error:
        model_module.load_model(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)
    assert time.perf_counter() - start < 20  # refused before building anything big


def _raw_safetensors(path, header: bytes, length=None, data=b""):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED_HEADERS = {
    "huge length": (b"{}", 2**62, b""),
    "length past the end": (b"{}", 10**6, b""),
    "zero length": (b"{}", 0, b""),
    "not JSON": (b"{abc}", None, b""),
    "a JSON list": (b"[1, 2]", None, b""),
    "offsets out of range": (json.dumps({"w": _entry(offsets=(0, 1600))}).encode(), None, bytes(16)),
    "overlapping": (json.dumps({"w": _entry(), "v": _entry(offsets=(8, 24))}).encode(), None, bytes(24)),
    "unknown dtype": (json.dumps({"w": _entry(dtype="X99")}).encode(), None, bytes(16)),
    "shape and bytes differ": (json.dumps({"w": _entry(shape=(2, 3))}).encode(), None, bytes(16)),
    "overflowing shape": (json.dumps({"w": _entry(shape=(2**40, 2**40))}).encode(), None, bytes(16)),
    "metadata not strings": (json.dumps({"__metadata__": {"a": 1}, "w": _entry()}).encode(), None, bytes(16)),
    "truncated": (json.dumps({"w": _entry()}).encode(), None, bytes(8)),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, case):
    header, length, data = MALFORMED_HEADERS[case]
    file = _raw_safetensors(tmp_path / "model.safetensors", header, length, data)
    with pytest.raises(CheckpointError, match=rf"{file} is not a readable safetensors file \(.+\)") as error:
        checkpoint.read_header(file)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match=rf"{file} is not a readable safetensors file"):
        formats.load_unet(file)
