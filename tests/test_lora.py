"""minidream.lora: layers, injection, several adapters, merge/unmerge, against peft (fp32, CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

from lora_models import (count_trainable_parameters, randomize_lora, reference_unet, rel_err, run_reference,
                         run_under_test, set_active_adapters, set_adapter_scale, text_encoders, token_ids,
                         unet_inputs, unet_under_test)
from minidream.lora import (TEXT_ATTENTION, UNET_ATTENTION, UNET_CONV, UNET_FEEDFORWARD, UNET_PROJ,
                            LoRAConv2d, LoRALinear, adapter_names, inject_lora, lora_parameters, lora_state_dict,
                            mark_only_lora_trainable, wrap_module)
from minidream.formats.lora_merge import merge_layer, merge_lora, remove_adapter, unmerge_layer, unmerge_lora
from minidream.lora_file import get_adapter_weights

ROOT = Path(__file__).resolve().parent.parent


def copy_peft_into_ours(peft_model: nn.Module, ours: nn.Module, adapter: str = "default") -> int:
    """Copy peft's lora_A/lora_B (named <module>.lora_A.<adapter>.weight) into minidream's layers."""
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(peft_params[name + ".weight"])
                copied += 1
    return copied


# ---------------------------------------------------------------------------------------------
# Against peft


def test_unet_lora_equals_peft_with_alpha_not_rank():
    targets = UNET_ATTENTION + UNET_FEEDFORWARD + UNET_PROJ + UNET_CONV  # Linear, 1x1 and 3x3 convs
    ref = reference_unet()
    ours = unet_under_test(ref)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    inject_lora(ours, targets, rank=4, alpha=8)
    randomize_lora(ref)
    assert copy_peft_into_ours(ref, ours) == 2 * len([m for m in ours.modules() if isinstance(m, (LoRALinear, LoRAConv2d))])
    assert any(isinstance(m, LoRAConv2d) and m.kernel_size == (3, 3) for m in ours.modules())

    mark_only_lora_trainable(ours)
    assert count_trainable_parameters(ours) == sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n)

    inp = unet_inputs()
    with torch.no_grad():
        expected, got = run_reference(ref, inp), run_under_test(ours, inp)
        plain = run_reference(reference_unet(), inp)
    err = rel_err(got, expected)
    print(f"UNet vs peft rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(got, plain) > 1e-2  # the adapters are not a no-op


def test_text_encoder_lora_equals_peft():
    ref, _ = text_encoders()
    ours, _ = text_encoders()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=5, target_modules=list(TEXT_ATTENTION)), ref)
    inject_lora(ours, "text", rank=2, alpha=5)
    randomize_lora(ref)
    copy_peft_into_ours(ref, ours)
    ids = token_ids()
    with torch.no_grad():
        got, want = ours(ids).last_hidden_state, ref(ids).last_hidden_state
        plain = text_encoders()[0](ids).last_hidden_state
    err = rel_err(got, want)
    print(f"text encoder vs peft rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(got, plain) > 1e-3


def test_fresh_adapter_matches_peft_init_and_changes_nothing():
    """A ~ U(+-1/sqrt(fan_in)) (kaiming_uniform a=sqrt(5), peft/loralib default), B = 0."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 96), nn.Conv2d(8, 16, 3, padding=1))
    ours = nn.Sequential(nn.Linear(256, 96), nn.Conv2d(8, 16, 3, padding=1))
    ours.load_state_dict(base.state_dict())
    peft_model = inject_adapter_in_model(LoraConfig(r=64, target_modules=["0", "1"]),
                                         nn.Sequential(nn.Linear(256, 96), nn.Conv2d(8, 16, 3, padding=1)))
    inject_lora(ours, ("0", "1"), rank=64)
    for i, fan_in in ((0, 256), (1, 8 * 9)):
        a, peft_a = ours[i].lora_A["default"], peft_model[i].lora_A["default"].weight
        assert a.shape == peft_a.shape and ours[i].lora_B["default"].shape == peft_model[i].lora_B["default"].weight.shape
        assert a.abs().max() <= 1 / math.sqrt(fan_in) and peft_a.abs().max() <= 1 / math.sqrt(fan_in)
        assert a.std().item() == pytest.approx(peft_a.std().item(), rel=0.05)  # same distribution
        assert torch.count_nonzero(ours[i].lora_B["default"]) == 0
    x = torch.randn(2, 256)
    assert torch.equal(ours[0](x), base[0](x))


def test_sdxl_rank4_trainable_count_equals_peft():
    config = json.loads((ROOT / "configs/sdxl-base-1.0/unet/config.json").read_text())
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(config)
        ref = UNet2DConditionModel.from_config(config)
    inject_lora(ours, rank=4)  # default targets: to_q, to_k, to_v, to_out.0
    mark_only_lora_trainable(ours)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=list(UNET_ATTENTION)), ref, low_cpu_mem_usage=True)
    peft_count = sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n)
    ours_count = count_trainable_parameters(ours)
    print(f"SDXL rank-4 attention LoRA: {ours_count} trainable parameters (peft: {peft_count})")
    assert ours_count == peft_count
    assert len(lora_parameters(ours)) == 2 * 70 * 8  # 70 transformer blocks x 8 projections


# ---------------------------------------------------------------------------------------------
# Layers, several adapters, merge


def test_base_state_dict_keys_unchanged_and_only_lora_trainable():
    ref = reference_unet()
    ours = unet_under_test(ref)
    before = ours.state_dict()
    names = inject_lora(ours, rank=2)
    after = ours.state_dict()
    base_keys = [k for k in after if ".lora_" not in k]
    assert base_keys == list(before)  # same keys, same order
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    assert set(lora_state_dict(ours)) == {f"{n}.lora_{ab}.default" for n in names for ab in "AB"}
    mark_only_lora_trainable(ours)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(ours))


def test_linear_forward_is_eq3_with_dropout_before_A():
    torch.manual_seed(0)
    layer = LoRALinear.wrap(nn.Linear(6, 5))
    layer.add_adapter("a", rank=3, alpha=6, dropout=0.5)
    randomize_lora(nn.ModuleDict({"l": layer}))
    A, B, W, b = layer.lora_A["a"], layer.lora_B["a"], layer.weight, layer.bias
    x = torch.randn(4, 6)
    layer.eval()
    assert torch.allclose(layer(x), x @ W.T + b + 2.0 * x @ A.T @ B.T, atol=1e-6)
    layer.train()  # dropout acts on the adapter's input only
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    want = x @ W.T + b + 2.0 * F.dropout(x, 0.5, True) @ A.T @ B.T
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv_lora_equals_conv_with_delta_weight(kernel, stride, padding):
    torch.manual_seed(0)
    layer = LoRAConv2d.wrap(nn.Conv2d(4, 6, kernel, stride, padding))
    layer.add_adapter("a", rank=2, alpha=3)
    randomize_lora(nn.ModuleDict({"l": layer}))
    x = torch.randn(2, 4, 9, 9)
    weight = layer.weight + 1.5 * layer.delta_weight("a")
    assert torch.allclose(layer(x), F.conv2d(x, weight, layer.bias, stride, padding), atol=1e-5)


def test_two_adapters_sum_of_scaled_deltas_and_merge():
    torch.manual_seed(0)
    layer = LoRALinear.wrap(nn.Linear(8, 7))
    layer.add_adapter("subject", rank=4, alpha=8, scale=1.0)
    layer.add_adapter("style", rank=2, alpha=1, scale=0.8)
    randomize_lora(nn.ModuleDict({"l": layer}))
    w0 = layer.weight.detach().clone()
    delta = 1.0 * (8 / 4) * layer.lora_B["subject"] @ layer.lora_A["subject"] \
        + 0.8 * (1 / 2) * layer.lora_B["style"] @ layer.lora_A["style"]
    x = torch.randn(3, 8)
    unfused = layer(x)
    assert torch.allclose(unfused, F.linear(x, w0 + delta, layer.bias), atol=1e-5)
    merge_layer(layer)
    assert torch.allclose(layer.weight, w0 + delta, atol=1e-6)
    assert torch.allclose(layer(x), unfused, atol=1e-5)
    unmerge_layer(layer)
    assert (layer.weight - w0).abs().max() <= 1e-6


def test_unet_fused_equals_unfused_and_unmerge_restores():
    ref = reference_unet()
    ours = unet_under_test(ref)
    inject_lora(ours, UNET_ATTENTION + UNET_CONV, name="subject", rank=4, alpha=2)
    inject_lora(ours, UNET_ATTENTION, name="style", rank=2, alpha=4, scale=0.8)
    randomize_lora(ours)
    base = {k: v.clone() for k, v in ours.state_dict().items() if ".lora_" not in k}
    inp = unet_inputs()
    with torch.no_grad():
        unfused = run_under_test(ours, inp)
        merge_lora(ours)
        fused = run_under_test(ours, inp)
        unmerge_lora(ours)
        restored = run_under_test(ours, inp)
        plain = run_reference(ref, inp)
    err = rel_err(fused, unfused)
    print(f"fused vs unfused rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(restored, unfused) <= 1e-5  # weights come back up to fp32 rounding
    worst = max((ours.state_dict()[k] - v).abs().max().item() for k, v in base.items())
    print(f"unmerge max abs weight error {worst:.2e}")
    assert worst <= 1e-6
    print(f"adapters change the output by {rel_err(unfused, plain):.2e} (relative)")
    assert rel_err(unfused, plain) > 1e-3  # the adapters really change the output


def test_scale_and_active_adapters():
    ref = reference_unet()
    ours = unet_under_test(ref)
    inject_lora(ours, name="a", rank=2)
    inject_lora(ours, name="b", rank=2)
    randomize_lora(ours)
    inp = unet_inputs()
    with torch.no_grad():
        set_adapter_scale(ours, "b", 0.0)
        only_a_by_scale = run_under_test(ours, inp)
        set_adapter_scale(ours, "b", 1.0)
        set_active_adapters(ours, ["a"])
        only_a = run_under_test(ours, inp)
        remove_adapter(ours, "b")
        assert adapter_names(ours) == ["a"]
        after_remove = run_under_test(ours, inp)
    assert torch.allclose(only_a, only_a_by_scale, atol=1e-6)
    assert torch.equal(only_a, after_remove)


def test_low_precision_base_with_fp32_lora():
    torch.manual_seed(0)
    layer = LoRALinear.wrap(nn.Linear(8, 4).to(torch.bfloat16))
    layer.add_adapter("a", rank=2, alpha=2)
    assert layer.lora_A["a"].dtype == torch.float32
    out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B["a"].grad is not None and layer.lora_B["a"].grad.dtype == torch.float32


def test_get_adapter_weights_round_trip():
    ours = unet_under_test(reference_unet())
    inject_lora(ours, rank=3, alpha=5)
    weights = get_adapter_weights(ours, "default")
    assert {w.rank for w in weights.values()} == {3} and {w.alpha for w in weights.values()} == {5.0}


# ---------------------------------------------------------------------------------------------
# Bad input


def test_errors():
    ours = unet_under_test(reference_unet())
    with pytest.raises(ValueError, match=r"to_qq.*match no Linear/Conv2d"):
        inject_lora(ours, ("to_qq",))
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        wrap_module(ours, "conv_norm_out")  # a GroupNorm
    inject_lora(ours, rank=2)
    with pytest.raises(ValueError, match="already exists"):
        inject_lora(ours, rank=2)
    with pytest.raises(ValueError, match="identifier"):
        inject_lora(ours, name="my.lora")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        set_adapter_scale(ours, "nope", 1.0)
    merge_lora(ours)
    with pytest.raises(RuntimeError, match="unmerge"):
        merge_lora(ours)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapter_scale(ours, "default", 0.5)
