"""minidream.lora: layers, injection, dropout; formats.lora_stack: several adapters, merge/unmerge;
against peft (fp32, CPU)."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

from lora_models import (count_trainable_parameters, randomize_lora, reference_unet, rel_err, run_reference,
                         run_under_test, set_active_adapters, set_adapter_scale, stack_random_adapter,
                         text_encoders, token_ids, unet_inputs, unet_under_test)
from minidream.cli.args import config_from_args, train_parser
from minidream.lora import (TEXT_ATTENTION, UNET_ATTENTION, UNET_CONV, UNET_FEEDFORWARD, UNET_PROJ,
                            LoRAConv2d, LoRALinear, inject_lora, lora_layer, lora_layers, lora_parameters,
                            lora_state_dict, mark_only_lora_trainable)
from minidream.formats.lora_stack import (adapter_names, merge_layer, merge_lora, remove_adapter, stack_layer,
                                          unmerge_layer, unmerge_lora)
from minidream.lora_file import get_adapter_weights
from minidream.method import LoRA

ROOT = Path(__file__).resolve().parent.parent


def copy_peft_into_ours(peft_model: nn.Module, ours: nn.Module) -> int:
    """Copy peft's lora_A/lora_B (<module>.lora_A.default.weight) into minidream's (<module>.lora_A.weight)."""
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(peft_params[re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", name)])
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
        a, peft_a = ours[i].lora_A.weight, peft_model[i].lora_A["default"].weight
        assert a.shape == peft_a.shape and ours[i].lora_B.weight.shape == peft_model[i].lora_B["default"].weight.shape
        assert a.abs().max() <= 1 / math.sqrt(fan_in) and peft_a.abs().max() <= 1 / math.sqrt(fan_in)
        assert a.std().item() == pytest.approx(peft_a.std().item(), rel=0.05)  # same distribution
        assert torch.count_nonzero(ours[i].lora_B.weight) == 0
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
    assert set(lora_state_dict(ours)) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    mark_only_lora_trainable(ours)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(ours))


def test_linear_forward_is_eq3_with_dropout_before_A():
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(6, 5), rank=3, alpha=6, dropout=0.5)
    randomize_lora(nn.ModuleDict({"l": layer}))
    A, B, W, b = layer.lora_A.weight, layer.lora_B.weight, layer.weight, layer.bias
    x = torch.randn(4, 6)
    layer.eval()  # dropout is the identity
    assert torch.allclose(layer(x), x @ W.T + b + 2.0 * x @ A.T @ B.T, atol=1e-6)
    layer.train()  # dropout acts on the adapter's input only
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    want = x @ W.T + b + 2.0 * F.dropout(x, 0.5, True) @ A.T @ B.T
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, layer.eval()(x), atol=1e-3)  # the dropout really acted


def test_lora_dropout_setting_reaches_the_layers_and_equals_peft():
    """train.py --lora-dropout 0.25: every adapter drops its input while training (as peft's
    lora_dropout, the same numbers from the same seed), and is exact eq. 3 in eval mode."""
    cfg = config_from_args(train_parser("train").parse_args(["--lora-dropout", "0.25", "--lora-targets", "attn"]))
    ref = reference_unet()
    ours = unet_under_test(ref)
    LoRA(SimpleNamespace(unet=ours, text=None), cfg, "rraj", "person")
    layers = lora_layers(ours)
    assert layers and all(layer.lora_dropout.p == 0.25 and layer.training for _, layer in layers)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.25, target_modules=list(UNET_ATTENTION)))
    randomize_lora(ref)
    copy_peft_into_ours(ref, ours)
    ref.train()
    inp = unet_inputs()
    with torch.no_grad():
        torch.manual_seed(7)
        want = run_reference(ref, inp)
        torch.manual_seed(7)
        got = run_under_test(ours, inp)
        torch.manual_seed(8)
        other = run_under_test(ours, inp)
        ours.eval(), ref.eval()
        eval_got, eval_want = run_under_test(ours, inp), run_reference(ref, inp)
    print(f"train mode with dropout vs peft rel err {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-5
    assert rel_err(other, got) > 1e-4  # another seed, another dropout mask
    assert rel_err(eval_got, eval_want) <= 1e-5 and rel_err(eval_got, got) > 1e-4


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv_lora_equals_conv_with_delta_weight(kernel, stride, padding):
    torch.manual_seed(0)
    layer = lora_layer(nn.Conv2d(4, 6, kernel, stride, padding), rank=2, alpha=3)
    randomize_lora(nn.ModuleDict({"l": layer}))
    x = torch.randn(2, 4, 9, 9)
    delta = (layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1)).view(layer.weight.shape)
    weight = layer.weight + 1.5 * delta
    assert torch.allclose(layer(x), F.conv2d(x, weight, layer.bias, stride, padding), atol=1e-5)
    stacked = stack_layer(nn.Conv2d(4, 6, kernel, stride, padding))  # the same with formats.lora_stack
    stacked.load_state_dict(layer.state_dict(), strict=False)
    stacked.add_adapter("a", layer.lora_A.weight, layer.lora_B.weight, alpha=3)
    assert torch.equal(stacked.delta_weight("a"), delta)
    assert torch.allclose(stacked(x), layer(x), atol=1e-6)


def test_two_adapters_sum_of_scaled_deltas_and_merge():
    torch.manual_seed(0)
    layer = stack_layer(nn.Linear(8, 7))
    layer.add_adapter("subject", torch.randn(4, 8) * 0.1, torch.randn(7, 4) * 0.1, alpha=8, scale=1.0)
    layer.add_adapter("style", torch.randn(2, 8) * 0.1, torch.randn(7, 2) * 0.1, alpha=1, scale=0.8)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"} | {
        f"lora_{ab}.{name}.weight" for ab in "AB" for name in ("subject", "style")}  # peft's names
    w0 = layer.weight.detach().clone()
    A, B = {n: m.weight for n, m in layer.lora_A.items()}, {n: m.weight for n, m in layer.lora_B.items()}
    delta = 1.0 * (8 / 4) * B["subject"] @ A["subject"] + 0.8 * (1 / 2) * B["style"] @ A["style"]
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
    stack_random_adapter(ours, UNET_ATTENTION + UNET_CONV, "subject", rank=4, alpha=2)
    stack_random_adapter(ours, UNET_ATTENTION, "style", rank=2, alpha=4, scale=0.8)
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


def test_stacked_adapters_equal_peft_multi_adapter():
    """Two named adapters with their own alphas and strengths (0.8) against peft's set_adapters."""
    ref = reference_unet()
    ours = unet_under_test(ref)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(UNET_ATTENTION)), adapter_name="a")
    ref.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=list(UNET_ATTENTION)), adapter_name="b")
    ref.set_adapters(["a", "b"], [1.0, 0.8])
    randomize_lora(ref)
    params = dict(ref.named_parameters())
    for name, rank, alpha, scale in (("a", 4, 8, 1.0), ("b", 2, 1, 0.8)):
        stack_random_adapter(ours, UNET_ATTENTION, name, rank=rank, alpha=alpha, scale=scale)
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if ".lora_" in key:
                p.copy_(params[key])  # the same names as peft's: <module>.lora_A.<adapter>.weight
    inp = unet_inputs()
    with torch.no_grad():
        err = rel_err(run_under_test(ours, inp), run_reference(ref, inp))
    print(f"two stacked adapters vs peft rel err {err:.2e}")
    assert err <= 1e-5


def test_scale_and_active_adapters():
    ref = reference_unet()
    ours = unet_under_test(ref)
    stack_random_adapter(ours, UNET_ATTENTION, "a", rank=2, alpha=2)
    stack_random_adapter(ours, UNET_ATTENTION, "b", rank=2, alpha=2)
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
    layer = lora_layer(nn.Linear(8, 4).to(torch.bfloat16), rank=2, alpha=2)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.dtype == torch.float32


def test_get_adapter_weights_round_trip():
    ours = unet_under_test(reference_unet())
    inject_lora(ours, rank=3, alpha=5)
    weights = get_adapter_weights(ours)
    assert {w.rank for w in weights.values()} == {3} and {w.alpha for w in weights.values()} == {5.0}


# ---------------------------------------------------------------------------------------------
# Bad input


def test_errors():
    ours = unet_under_test(reference_unet())
    with pytest.raises(ValueError, match=r"to_qq.*match no Linear/Conv2d"):
        inject_lora(ours, ("to_qq",))
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        lora_layer(ours.get_submodule("conv_norm_out"), rank=2, alpha=2)  # a GroupNorm
    with pytest.raises(TypeError, match="groups=1"):
        lora_layer(nn.Conv2d(4, 4, 3, groups=2), rank=2, alpha=2)
    inject_lora(ours, rank=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(ours, rank=2)

    stacked = unet_under_test(reference_unet())
    stack_random_adapter(stacked, UNET_ATTENTION, "default", rank=2, alpha=2)
    with pytest.raises(ValueError, match="already loaded"):
        stack_random_adapter(stacked, UNET_ATTENTION, "default", rank=2, alpha=2)
    with pytest.raises(ValueError, match="identifier"):
        stack_random_adapter(stacked, UNET_ATTENTION, "my.lora", rank=2, alpha=2)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        set_adapter_scale(stacked, "nope", 1.0)
    with pytest.raises(ValueError, match="carries a LoRA being trained"):
        stack_random_adapter(ours, UNET_ATTENTION, "file", rank=2, alpha=2)
    merge_lora(stacked)
    with pytest.raises(RuntimeError, match="unmerge"):
        merge_lora(stacked)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapter_scale(stacked, "default", 0.5)
