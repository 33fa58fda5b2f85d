"""minidream.methods.dora against peft's DoRA (LoraConfig(use_dora=True)), float64, CPU: the same
outputs and gradients (A, B, magnitude, input) to rounding; DoRA files in the diffusers/peft and
kohya layouts written, read back, loaded by diffusers and fused as peft's merge_and_unload does."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from minidream.lora import LoRALayer
from minidream.methods.dora import (DoRAConv2d, DoRALinear, DoRAQuantLinear, dora_parameters,
                                    dora_state_dict, inject_dora, load_dora_state_dict,
                                    mark_only_dora_trainable)
from minidream.quant.linear import quantise_model

F64 = torch.float64


class Tiny(nn.Module):
    """One Linear and one Conv2d (with biases), the two layer kinds DoRA adapts."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 7)
        self.conv = nn.Conv2d(5, 6, 3, padding=1)

    def forward(self, x, image):
        return self.lin(x), self.conv(image)


def randomize(named_parameters, seed=3):
    """Non-zero B (and A, m) so that the comparison is not trivially the base model's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(named_parameters):
            if "lora_" in name:
                p.copy_(p + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def peft_and_ours(rank=2, alpha=6.0, dropout=0.0):
    torch.manual_seed(0)
    base = Tiny().to(F64)
    config = LoraConfig(use_dora=True, r=rank, lora_alpha=alpha, target_modules=["lin", "conv"],
                        lora_dropout=dropout)
    theirs = get_peft_model(copy.deepcopy(base), config).to(F64)
    randomize(theirs.named_parameters())
    ours = copy.deepcopy(base)
    inject_dora(ours, ("lin", "conv"), rank=rank, alpha=alpha, dropout=dropout, dtype=F64)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(theirs).items()}
    load_dora_state_dict(ours, state)  # peft's own state-dict keys and shapes load as they are
    return theirs, ours


def outputs_and_grads(model, params):
    torch.manual_seed(7)  # the same dropout masks: both draw them in the same order
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 12, generator=g, dtype=F64, requires_grad=True)
    image = torch.randn(2, 5, 6, 6, generator=g, dtype=F64, requires_grad=True)
    y_lin, y_conv = model(x, image)
    loss = (y_lin * torch.randn(y_lin.shape, generator=g, dtype=F64)).sum() \
        + (y_conv * torch.randn(y_conv.shape, generator=g, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, [x, image, *params])
    return [y_lin, y_conv], grads


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("rank,alpha,dropout", [(2, 6.0, 0.0), (3, 3.0, 0.0), (2, 5.0, 0.4)])
def test_outputs_and_gradients_equal_peft(rank, alpha, dropout):
    """alpha != r and alpha = r; with dropout (training mode) W0 also sees the dropped-out input."""
    theirs, ours = peft_and_ours(rank, alpha, dropout)
    theirs.train(dropout > 0), ours.train(dropout > 0)
    assert isinstance(ours.lin, DoRALinear) and isinstance(ours.conv, DoRAConv2d)
    names = [f"{m}.{p}" for m in ("lin", "conv") for p in ("lora_A.weight", "lora_B.weight",
                                                            "lora_magnitude_vector")]
    assert sorted(dora_state_dict(ours)) == sorted(names)  # peft's keys, less base_model.model.
    peft_params = dict(theirs.named_parameters())
    peft_names = {"lin.lora_A.weight": "lin.lora_A.default.weight",
                  "lin.lora_B.weight": "lin.lora_B.default.weight",
                  "lin.lora_magnitude_vector": "lin.lora_magnitude_vector.default.weight"}
    peft_names |= {k.replace("lin", "conv"): v.replace("lin", "conv") for k, v in peft_names.items()}
    mark_only_dora_trainable(ours)
    trained = {id(p) for p in ours.parameters() if p.requires_grad}
    assert trained == {id(p) for p in dora_parameters(ours)} and len(trained) == 6
    got = outputs_and_grads(ours, dora_parameters(ours))
    want = outputs_and_grads(theirs, [peft_params["base_model.model." + peft_names[n]] for n in names])
    errs = [rel(a, b) for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1]))]
    print(f"rank {rank} alpha {alpha} dropout {dropout}: max rel err outputs {max(errs[:2]):.1e}, "
          f"grads (x, image, A, B, m...) {max(errs[2:]):.1e}")
    assert max(errs) <= 1e-12
    assert min(rel(a, torch.zeros_like(a)) for a in got[1]) > 0  # every gradient is there


def test_norm_is_detached_and_magnitude_starts_at_the_weight_norm():
    torch.manual_seed(0)
    model = Tiny().to(F64)
    inject_dora(model, ("lin", "conv"), rank=2, alpha=4, dtype=F64)
    w = model.lin.weight
    assert torch.equal(model.lin.lora_magnitude_vector, w.norm(dim=1))  # ||W0||_c, per output row
    assert model.conv.lora_magnitude_vector.shape == (1, 6, 1, 1)
    x = torch.randn(2, 12, dtype=F64)
    assert torch.allclose(model.lin(x), torch.nn.functional.linear(x, w, model.lin.bias))  # B = 0
    f = model.lin.dora_factor()  # m / ||W0 + s B A||: the norm is a constant (sec. 4.3)
    assert torch.autograd.grad(f.sum(), model.lin.lora_B.weight, allow_unused=True) == (None,)


def test_quantised_base():
    torch.manual_seed(0)
    model = quantise_model(Tiny(), "int8")
    inject_dora(model, ("lin",), rank=2, alpha=2)
    layer = model.lin
    assert isinstance(layer, DoRAQuantLinear) and isinstance(layer, LoRALayer)
    randomize(model.named_parameters())
    x = torch.randn(4, 12)
    w = layer.weight + layer.delta_weight()
    want = torch.nn.functional.linear(x, w * (layer.lora_magnitude_vector / w.norm(dim=1))[:, None],
                                      layer.bias)
    assert rel(layer(x), want) < 1e-5
    layer(x).sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_B.weight.grad is not None
