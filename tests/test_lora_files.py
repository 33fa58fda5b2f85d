"""minidream.formats.lora_files: the files minidream writes load in diffusers with the same numbers, and
kohya / old-diffusers / SGM-named files built here load to the same adapter. fp32, CPU."""

import copy
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

import minidream.formats.lora_files as lora_files
from lora_models import (randomize_lora, reference_unet, rel_err, run_reference, run_under_test,
                         text_encoders, token_ids, unet_inputs, unet_under_test)
from minidream import __version__
from minidream.formats.lora_weights import LoRAFileError, LoRAMismatchError
from minidream.formats.lora_stack import LoRAStack
from minidream.lora import LoRALayer, inject_lora
from minidream.lora_file import get_adapter_weights
from minidream.formats.lora_files import detect_layout, load_lora, read_lora, save_lora

ATTN1 = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
ATTN2 = ("attn2.to_q", "attn2.to_v", "attn2.to_out.0")


def base_models():
    """Fresh models under test with the reference weights: (unet, text_encoder, text_encoder_2)."""
    te1, te2 = text_encoders()
    return unet_under_test(reference_unet()), te1, te2


def trained_models(own_alpha: bool = True):
    """Models carrying adapter "default": alpha != rank, one module kind with its own rank
    (attn2.to_k) and one module with its own alpha, so rank_pattern / alpha_pattern are exercised.

    own_alpha=False keeps alpha uniform: diffusers 0.42.1 drops per-module alphas of kohya UNet
    files (its alpha_pattern keys keep the "processor.to_q_lora.down.weight" suffix and match nothing).
    """
    unet, te1, te2 = base_models()
    inject_lora(unet, ATTN1 + ATTN2, rank=4, alpha=8)
    inject_lora(unet, ("attn2.to_k",), rank=2, alpha=8)
    if own_alpha:
        unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").alpha = 3.0
    inject_lora(te1, "text", rank=2, alpha=3)
    inject_lora(te2, "text", rank=2, alpha=1)
    for seed, model in enumerate((unet, te1, te2)):
        randomize_lora(model, seed=seed)
    return unet, te1, te2


def outputs(unet, te1, te2, run=run_under_test):
    ids = token_ids()
    with torch.no_grad():
        o2 = te2(ids)
        return run(unet, unet_inputs()), te1(ids).last_hidden_state, o2.last_hidden_state, o2.text_embeds


def assert_same_outputs(got, want, tol=1e-5):
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    print("rel errs (unet, te1, te2 hidden, te2 pooled):", ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= tol


def diffusers_pipeline():
    unet = reference_unet()
    te1, te2 = text_encoders()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())


def loaded_by_diffusers(path):
    pipe = diffusers_pipeline()
    pipe.load_lora_weights(str(path))
    return pipe, outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, run=run_reference)


def loaded_by_minidream(path, **kw):
    unet, te1, te2 = base_models()
    name = load_lora(path, unet=unet, text_encoder=te1, text_encoder_2=te2, **kw)
    return name, (unet, te1, te2)


# ---------------------------------------------------------------------------------------------
# Writing: diffusers reads what minidream writes


def test_diffusers_layout_loads_in_diffusers_with_alpha_and_metadata(tmp_path):
    models = trained_models()
    path = save_lora(tmp_path / "subject-lora.safetensors", unet=models[0], text_encoder=models[1],
                     text_encoder_2=models[2], base_model="sdxl-base-1.0", token="rraj",
                     class_noun="person", steps=1000)
    want = outputs(*models)
    plain = outputs(*base_models())
    assert min(rel_err(w, p) for w, p in zip(want, plain)) > 1e-3  # every adapter changes its output

    tensors, meta = lora_files.read_safetensors(path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in tensors
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in tensors
    assert {k: meta[k] for k in ("rank", "alpha", "base_model", "token", "class_noun", "steps",
                                 "minidream_version")} == dict(
        rank="4", alpha="8.0", base_model="sdxl-base-1.0", token="rraj", class_noun="person",
        steps="1000", minidream_version=__version__)
    assert all(isinstance(v, str) for v in meta.values())

    pipe, got = loaded_by_diffusers(path)
    assert_same_outputs(got, want)
    # diffusers' layer really scales by alpha / r (not 1): 8/4 generally, 3/4 and 8/2 where set.
    blocks = "down_blocks.1.attentions.0.transformer_blocks.0"
    scaling = lambda name: next(iter(pipe.unet.get_submodule(f"{blocks}.{name}").scaling.values()))  # noqa: E731
    assert (scaling("attn1.to_k"), scaling("attn1.to_q"), scaling("attn2.to_k")) == (2.0, 0.75, 4.0)

    name, ours = loaded_by_minidream(path)
    assert name == "subject_lora"
    assert_same_outputs(outputs(*ours), want, tol=0)


def test_kohya_layout_written_loads_in_diffusers_and_minidream(tmp_path):
    models = trained_models(own_alpha=False)
    path = save_lora(tmp_path / "k.safetensors", unet=models[0], text_encoder=models[1],
                     text_encoder_2=models[2], layout="kohya")
    tensors, _ = lora_files.read_safetensors(path)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{stem}.alpha"].item() == 8.0 and tensors[f"{stem}.lora_down.weight"].shape == (4, 64)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.alpha" in tensors
    assert read_lora(path).layout == "kohya"
    want = outputs(*models)
    assert_same_outputs(loaded_by_diffusers(path)[1], want)
    assert_same_outputs(outputs(*loaded_by_minidream(path)[1]), want, tol=0)


# ---------------------------------------------------------------------------------------------
# Reading files other tools write (built here key by key)


def test_kohya_file_built_by_hand_equals_diffusers_layout(tmp_path):
    models = trained_models()
    tensors = {}
    for prefix, model in zip(("lora_unet_", "lora_te1_text_model_", "lora_te2_"), models):
        for path, w in get_adapter_weights(model).items():
            stem = prefix + path.replace(".", "_")
            tensors.update({f"{stem}.lora_down.weight": w.down, f"{stem}.lora_up.weight": w.up,
                            f"{stem}.alpha": torch.tensor(w.alpha, dtype=torch.float16)})
    save_file(tensors, tmp_path / "kohya.safetensors")
    save_lora(tmp_path / "diffusers.safetensors", unet=models[0], text_encoder=models[1], text_encoder_2=models[2])
    _, from_kohya = loaded_by_minidream(tmp_path / "kohya.safetensors")
    _, from_diffusers = loaded_by_minidream(tmp_path / "diffusers.safetensors")
    assert_same_outputs(outputs(*from_kohya), outputs(*from_diffusers), tol=0)
    assert_same_outputs(outputs(*from_kohya), outputs(*models), tol=0)


def test_old_diffusers_layout_built_by_hand(tmp_path):
    """`...to_q.lora.down.weight`, the processor spelling `...attn1.processor.to_q_lora.down.weight`
    and text `...q_proj.lora_linear_layer.down.weight`; no alpha in the file means alpha = rank,
    so the test folds alpha / rank into `up`."""
    models = trained_models()
    tensors = {}
    for i, (path, w) in enumerate(get_adapter_weights(models[0]).items()):
        up = w.up * (w.alpha / w.rank)
        if i % 2:
            stem = f"unet.{path}.lora"
        else:
            parent, proj = re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out\.0)", path).groups()
            stem = f"unet.{parent}.processor.{proj.removesuffix('.0')}_lora"
        tensors.update({f"{stem}.down.weight": w.down, f"{stem}.up.weight": up})
    for component, model in zip(("text_encoder", "text_encoder_2"), models[1:]):
        for path, w in get_adapter_weights(model).items():
            stem = f"{component}.text_model.{path.removeprefix('text_model.')}.lora_linear_layer"
            tensors.update({f"{stem}.down.weight": w.down, f"{stem}.up.weight": w.up * (w.alpha / w.rank)})
    save_file(tensors, tmp_path / "old.safetensors")
    assert read_lora(tmp_path / "old.safetensors").layout == "diffusers_old"
    _, ours = loaded_by_minidream(tmp_path / "old.safetensors")
    assert_same_outputs(outputs(*ours), outputs(*models))


def test_file_written_by_diffusers_training_script(tmp_path):
    """What diffusers' SDXL DreamBooth LoRA script saves: peft weights converted to the old
    `.lora.down` spelling, plus the peft LoraConfig (alpha 8, rank 4) as metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = reference_unet()
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora(ref)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(ref)),
        unet_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert read_lora(path).layout == "diffusers_old"
    unet = unet_under_test(reference_unet())
    load_lora(path, unet=unet)
    inp = unet_inputs()
    with torch.no_grad():
        assert rel_err(run_under_test(unet, inp), run_reference(ref, inp)) <= 1e-5


def test_kohya_sgm_named_file(tmp_path):
    models = trained_models(own_alpha=False)
    path = save_lora(tmp_path / "sgm.safetensors", unet=models[0], text_encoder=models[1],
                     text_encoder_2=models[2], layout="kohya_sgm")
    keys = set(lora_files.read_safetensors(path)[0])
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_out_0.alpha" in keys
    assert read_lora(path).layout == "kohya_sgm"
    want = outputs(*models)
    assert_same_outputs(loaded_by_diffusers(path)[1], want)  # diffusers maps SGM blocks itself
    assert_same_outputs(outputs(*loaded_by_minidream(path)[1]), want, tol=0)


def test_detect_layout():
    assert detect_layout(["unet.a.to_q.lora_A.weight", "unet.a.to_q.lora_B.weight"]) == "diffusers"
    assert detect_layout(["unet.a.to_q.lora.down.weight", "unet.a.to_q.alpha"]) == "diffusers_old"
    assert detect_layout(["a.processor.to_q_lora.up.weight"]) == "diffusers_old"
    assert detect_layout(["lora_unet_down_blocks_1_x.lora_down.weight", "lora_te1_y.alpha"]) == "kohya"
    assert detect_layout(["lora_unet_input_blocks_4_1_x.lora_down.weight"]) == "kohya_sgm"
    with pytest.raises(ValueError, match="mixes LoRA key layouts"):
        detect_layout(["unet.a.lora_A.weight", "lora_unet_a.lora_down.weight"])


# ---------------------------------------------------------------------------------------------
# Bad input


def _sd15_kohya_tensors():
    """Keys of an SD 1.5 LoRA: SD 1.5 has attention in down_blocks.0, SDXL does not."""
    t = {}
    for block in range(2):
        for proj in ("to_q", "to_k", "to_v"):
            stem = f"lora_unet_down_blocks_0_attentions_{block}_transformer_blocks_0_attn1_{proj}"
            t.update({f"{stem}.lora_down.weight": torch.zeros(4, 320), f"{stem}.lora_up.weight": torch.zeros(320, 4)})
    return t


def _unet_lora(path, down, up, extra=None):
    t = {f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up}
    return {**t, **(extra or {})}


Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
BAD = {
    "sd15_on_sdxl": (_sd15_kohya_tensors(), LoRAMismatchError,
                     r"6 LoRA key\(s\) match no module of the unet.*down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.*SD 1.5"),
    "typo": (_unet_lora(Q.replace("to_q", "to_qq"), torch.zeros(4, 64), torch.zeros(64, 4)),
             LoRAMismatchError, r"1 LoRA key\(s\) match no module.*attn1\.to_qq"),
    "rank": (_unet_lora(Q, torch.zeros(4, 64), torch.zeros(64, 2)), ValueError, rf"{re.escape(Q)} has a rank mismatch"),
    "shape": (_unet_lora(Q, torch.zeros(4, 320), torch.zeros(64, 4)), ValueError, rf"shape mismatch at {re.escape(Q)}"),
    "no_up": ({f"unet.{Q}.lora_A.weight": torch.zeros(4, 64)}, ValueError, r"has no up weight"),
    "text_but_no_encoder": ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
                             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)},
                            ValueError, r"text_encoder_2 LoRA module\(s\) but no text_encoder_2 was given"),
    "loha": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, LoRAMismatchError, r"not a LoRA file minidream can read"),
    "dora": (_unet_lora(Q, torch.zeros(4, 64), torch.zeros(64, 4), {f"unet.{Q}.lora_magnitude_vector": torch.zeros(63)}),
             ValueError, rf"DoRA magnitude mismatch at {re.escape(Q)}: 63 numbers for the 64 output channels"),
    # Valid UNet part, bad text-encoder part: the UNet must stay untouched.
    "atomic": (_unet_lora(Q, torch.zeros(4, 64), torch.zeros(64, 4),
                          {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 33),
                           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}),
               ValueError, r"shape mismatch at encoder\.layers\.0\.self_attn\.q_proj"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_is_an_error_and_changes_nothing(tmp_path, case):
    tensors, error, message = BAD[case]
    save_file(tensors, tmp_path / "bad.safetensors")
    unet, te1 = unet_under_test(reference_unet()), text_encoders()[0]
    with pytest.raises(error, match=message):
        load_lora(tmp_path / "bad.safetensors", unet=unet, text_encoder=te1)
    assert not any(isinstance(m, (LoRALayer, LoRAStack)) for model in (unet, te1) for m in model.modules())


def test_corrupt_missing_and_pickled_files(tmp_path):
    models = trained_models()
    good = save_lora(tmp_path / "good.safetensors", unet=models[0])
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a tensor file at all")
    torch.save({"a": torch.zeros(2)}, tmp_path / "pickled.safetensors")
    unet = unet_under_test(reference_unet())
    for name in ("truncated", "garbage"):
        with pytest.raises(ValueError, match=r"not a valid safetensors file \(corrupt or truncated\?\)"):
            load_lora(tmp_path / f"{name}.safetensors", unet=unet)
    with pytest.raises(ValueError, match="pickled PyTorch checkpoint"):
        load_lora(tmp_path / "pickled.safetensors", unet=unet)
    with pytest.raises(LoRAFileError, match="LoRA file not found"):
        load_lora(tmp_path / "missing.safetensors", unet=unet)
    load_lora(good, unet=unet, name="subject")
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(good, unet=unet, name="subject")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_two_files_as_two_adapters_with_scales(tmp_path):
    subject, style = trained_models()[0], copy.deepcopy(trained_models()[0])
    randomize_lora(style, seed=9)
    save_lora(tmp_path / "subject.safetensors", unet=subject)
    save_lora(tmp_path / "style.safetensors", unet=style)
    unet = unet_under_test(reference_unet())
    assert load_lora(tmp_path / "subject.safetensors", unet=unet) == "subject"
    assert load_lora(tmp_path / "style.safetensors", unet=unet, scale=0.8) == "style"
    layer = unet.get_submodule(Q)
    w_subject, w_style = get_adapter_weights(subject)[Q], get_adapter_weights(style)[Q]
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias) \
        + x @ (w_subject.alpha / w_subject.rank * w_subject.up @ w_subject.down).T \
        + x @ (0.8 * w_style.alpha / w_style.rank * w_style.up @ w_style.down).T
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-5)
    assert json.loads(read_lora(tmp_path / "style.safetensors").metadata["lora_adapter_metadata"])["unet.r"] == 4
