"""minidream.methods.dora against peft's DoRA (LoraConfig(use_dora=True)), float64, CPU: the same
outputs and gradients (A, B, magnitude, input) to rounding; DoRA files in the diffusers/peft and
kohya layouts written, read back, loaded by diffusers and fused as peft's merge_and_unload does;
`train.py --dora` (methods/dora_method.py) on a tiny model: its file, resume, --plan."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

import train as train_cli
from _train import interrupted_then_resumed, train_like_cli
from lora_models import rel_err, write_random_lora
from minidream.config import LORA_FILE, TrainConfig
from minidream.formats.lora_files import (DoRAWeights, add_loras, load_lora, read_lora,
                                          read_safetensors)
from minidream.formats.lora_stack import merge_lora, stack_layers, unmerge_lora
from minidream.formats.models import load_model
from minidream.lora import UNET_ATTENTION, LoRALayer
from minidream.lora_file import DIFFUSERS_METADATA_KEY
from minidream.formats.models import BUNDLED_MODEL, REPO
from minidream.methods.dora import (DoRAConv2d, DoRALinear, DoRAQuantLinear, dora_parameters,
                                    dora_state_dict, inject_dora, load_dora_state_dict,
                                    mark_only_dora_trainable)
from minidream.methods.dora_file import save_dora
from minidream.methods.dora_method import DoRA
from minidream.planner.memory import plan_training
from minidream.pipeline import sample_latents
from minidream.quant.linear import quantise_model
from minidream.toy.tiny import write_tiny_sdxl
from test_ema import (capture_methods, config, losses,  # noqa: F401
                      same_tensors, world)
from test_lora_files import assert_same_outputs, base_models, loaded_by_diffusers, outputs

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


# ---------------------------------------------------------------------------------------------
# Files: written by minidream, read by diffusers and minidream; peft's read by minidream

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"


def dora_models():
    """The tiny UNet and text encoders with random DoRA adapters (A, B and m all non-trivial):
    attention and a resnet conv in the UNet (alpha 8, rank 4), attention in the text encoders."""
    unet, te1, te2 = base_models()
    inject_dora(unet, ("attn1.to_q", "attn1.to_v", "attn2.to_out.0", "resnets.0.conv1"), rank=4, alpha=8)
    inject_dora(te1, "text", rank=2, alpha=3)
    inject_dora(te2, "text", rank=2, alpha=2)
    for seed, model in enumerate((unet, te1, te2)):
        randomize(model.named_parameters(), seed=seed)
    return unet, te1, te2


def test_diffusers_layout_loads_in_diffusers_and_minidream_fused(tmp_path):
    models = dora_models()
    path = save_dora(tmp_path / "dora.safetensors", unet=models[0], text_encoder=models[1],
                     text_encoder_2=models[2], token="rraj")
    tensors, meta = read_safetensors(path)
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert tensors[f"unet.{BLOCK}.attn1.to_q.lora_magnitude_vector"].shape == (64,)
    assert tensors[f"{conv}.lora_magnitude_vector"].shape == (1, 32, 1, 1)  # peft's conv shape
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector.weight" in tensors
    config = json.loads(meta[DIFFUSERS_METADATA_KEY])
    assert config["unet.use_dora"] and config["text_encoder.use_dora"] and meta["token"] == "rraj"
    want = outputs(*models)
    assert min(rel_err(w, p) for w, p in zip(want, outputs(*base_models()))) > 1e-3

    pipe, got = loaded_by_diffusers(path)
    assert type(pipe.unet.get_submodule(f"{BLOCK}.attn1.to_q").lora_magnitude_vector["default_0"]).__name__ \
        == "DoraLinearLayer"
    assert_same_outputs(got, want)
    ours = base_models()
    load_lora(path, unet=ours[0], text_encoder=ours[1], text_encoder_2=ours[2])
    assert_same_outputs(outputs(*ours), want)  # unfused: the adapted weight each call
    weights = [m.weight.clone() for model in ours for _, m in stack_layers(model)]
    for model in ours:
        merge_lora(model)
    assert_same_outputs(outputs(*ours), want)  # fused
    for model in ours:
        unmerge_lora(model)
    restored = [m.weight for model in ours for _, m in stack_layers(model)]
    # W0 = W' / f - s B A in fp32, with s B A several times W0 here: rounding, cancelled
    assert max(rel_err(a, b) for a, b in zip(restored, weights)) < 1e-4


@pytest.mark.parametrize("layout", ["kohya", "kohya_sgm"])
def test_kohya_layout_round_trip(tmp_path, layout):
    models = dora_models()
    path = save_dora(tmp_path / "k.safetensors", unet=models[0], text_encoder=models[1],
                     text_encoder_2=models[2], layout=layout)
    tensors, _ = read_safetensors(path)
    stem = "lora_unet_input_blocks_3_1" if layout == "kohya_sgm" else "lora_unet_down_blocks_1_attentions_0"
    assert tensors[f"{stem}_transformer_blocks_0_attn1_to_q.dora_scale"].shape == (64, 1)  # LyCORIS
    conv = "input_blocks_1_0_in_layers_2" if layout == "kohya_sgm" else "down_blocks_0_resnets_0_conv1"
    assert tensors[f"lora_unet_{conv}.dora_scale"].shape == (32, 1, 1, 1)
    assert read_lora(path).layout == layout
    ours = base_models()
    load_lora(path, unet=ours[0], text_encoder=ours[1], text_encoder_2=ours[2])
    for model in ours:
        merge_lora(model)
    assert_same_outputs(outputs(*ours), outputs(*models))



def peft_file(model, adapter: str, path, rank: int, alpha: float, dora: bool):
    """Adapter `adapter` of a peft model written as diffusers writes a UNet's: peft's own state-dict
    keys under "unet.", its LoraConfig in the metadata."""
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    tensors = {"unet." + k.removeprefix("base_model.model."): v.contiguous() for k, v in state.items()}
    config = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.use_dora": dora}
    save_file(tensors, path, metadata={DIFFUSERS_METADATA_KEY: json.dumps(config)})
    return path


@pytest.mark.parametrize("order", [("dora", "plain"), ("plain", "dora")])
def test_peft_files_fuse_as_merge_and_unload(tmp_path, order):
    """A peft DoRA adapter, stacked with a plain LoRA one in either order: minidream's stack gives
    peft's outputs unmerged and peft's merge_and_unload weights fused."""
    torch.manual_seed(0)
    base = Tiny()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, r=2, lora_alpha=6,
                                                            target_modules=["lin", "conv"]), "dora")
    theirs.add_adapter("plain", LoraConfig(r=3, lora_alpha=4, target_modules=["lin", "conv"]))
    theirs.base_model.set_adapter(list(order))
    randomize(theirs.named_parameters())
    files = {"dora": peft_file(theirs, "dora", tmp_path / "dora.safetensors", 2, 6, True),
             "plain": peft_file(theirs, "plain", tmp_path / "plain.safetensors", 3, 4, False)}
    ours = copy.deepcopy(base)
    for name in order:
        load_lora(files[name], unet=ours, name=name)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(3, 12, generator=g), torch.randn(2, 5, 6, 6, generator=g)
    with torch.no_grad():
        errs = [rel(a, b) for a, b in zip(ours(*inputs), theirs(*inputs))]
        merge_lora(ours)
        fused = theirs.merge_and_unload()
        errs += [rel(getattr(ours, m).weight, getattr(fused, m).weight) for m in ("lin", "conv")]
        plain = [rel(getattr(base, m).weight, getattr(fused, m).weight) for m in ("lin", "conv")]
    print(f"{' then '.join(order)}: max rel err outputs {max(errs[:2]):.1e}, "
          f"fused weights {max(errs[2:]):.1e}")
    assert max(errs) < 1e-6 and min(plain) > 0.1


def test_dora_file_on_a_quantised_model(tmp_path):
    """int8 Linear weights keep a DoRA file's adapter unmerged: each call runs the adapted weight,
    from W0 dequantised; the same as fusing the file into the dequantised weights."""
    torch.manual_seed(0)
    theirs = get_peft_model(Tiny(), LoraConfig(use_dora=True, r=2, lora_alpha=6, target_modules=["lin"]))
    randomize(theirs.named_parameters())
    path = peft_file(theirs, "default", tmp_path / "dora.safetensors", 2, 6, True)
    quantised = quantise_model(Tiny(), "int8")
    reference = Tiny()
    reference.lin.weight.data = quantised.lin.weight.clone()
    reference.lin.bias.data = quantised.lin.bias.clone()
    for model in (quantised, reference):
        load_lora(path, unet=model)
    merge_lora(reference)
    x = torch.randn(3, 12)
    with torch.no_grad():
        err = rel(quantised.lin(x), reference.lin(x))
    assert err < 1e-6 and not quantised.lin.merged


def test_kohya_input_axis_dora_scale(tmp_path):
    """LyCORIS with wd_on_out=False (OneTrainer's files): dora_scale (1, in[, 1, 1]) is the length of
    each input channel's weights (a column of W, over out and the kernel)."""
    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    parts = {"lin": (rand(2, 12), rand(7, 2), rand(1, 12).abs()),
             "conv": (rand(2, 5, 3, 3), rand(6, 2, 1, 1), rand(1, 5, 1, 1).abs())}
    tensors = {}
    for name, (down, up, scale) in parts.items():
        tensors |= {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                    f"lora_unet_{name}.alpha": torch.tensor(1.0), f"lora_unet_{name}.dora_scale": scale}
    save_file(tensors, tmp_path / "onetrainer.safetensors")
    want = {}
    for name, (down, up, scale) in parts.items():  # ComfyUI's weight_decompose, input axis
        w0 = getattr(model, name).weight.detach()
        w = w0 + (up.flatten(1) @ down.flatten(1)).view(w0.shape) * 0.5  # alpha 1 / rank 2
        want[name] = w * scale / w.transpose(0, 1).flatten(1).norm(dim=1).view(scale.shape)
    load_lora(tmp_path / "onetrainer.safetensors", unet=model)
    merge_lora(model)
    errs = [rel(getattr(model, name).weight, want[name]) for name in parts]
    assert max(errs) < 1e-6, errs


# ---------------------------------------------------------------------------------------------
# Sampling with DoRA files (sample.py's add_loras): the images diffusers makes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("dora") / "tiny-sdxl", seed=1, dtype=torch.float32)


def dora_file(folder, path, seed=3):
    """A DoRA file for the tiny SDXL in `folder`: UNet attention and conv1, text attention."""
    throwaway = load_model(folder)
    unet, te1 = throwaway.unet, throwaway.text.text_encoder
    inject_dora(unet, UNET_ATTENTION + ("resnets.0.conv1",), rank=4, alpha=8)
    inject_dora(te1, "text", rank=2, alpha=2)
    for i, model in enumerate((unet, te1)):
        randomize(model.named_parameters(), seed=seed + i)
    return save_dora(path, unet=unet, text_encoder=te1)


def test_sampling_with_dora_files_matches_diffusers(folder, tmp_path):
    """add_loras (fused) with a DoRA file alone, then stacked after a plain LoRA at strength 0.7,
    gives diffusers' latents (load_lora_weights + set_adapters)."""
    dora = dora_file(folder, tmp_path / "dora.safetensors")
    throwaway = load_model(folder)
    lora = write_random_lora(tmp_path / "lora.safetensors", throwaway.unet, seed=5)
    prompt, kw = "a photo of rraj person", dict(steps=4, seed=0, height=64, width=64, progress=False)
    plain = sample_latents(load_model(folder), prompt, **kw)
    for loras in ([(dora, 1.0)], [(lora, 1.0), (dora, 0.7)]):
        model = load_model(folder)
        add_loras(model, loras)
        got = sample_latents(model, prompt, **kw)
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        names = [f"a{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        want = pipe(prompt=prompt, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images
        print(f"{len(loras)} file(s): latents rel err {rel_err(got, want):.2e}")
        assert rel_err(got, want) <= 1e-4 and rel_err(got, plain) > 1e-2


# ---------------------------------------------------------------------------------------------
# Training: train.py --method lora --dora on the tiny model of test_ema.py's `world`


def test_a_dora_run_trains_the_magnitudes_and_writes_a_dora_file(world, tmp_path, monkeypatch):
    """UNet and text-encoder attention get DoRA layers; A, B and m train; the file is a DoRA file
    (diffusers layout, use_dora) that sample.py's add_loras turns back into the trained model."""
    built = capture_methods(monkeypatch, DoRA)
    run = train_like_cli(config(world, tmp_path, steps=3, dora=True, train_text_encoder=True,
                                text_encoder_lr=1e-3))
    (method,) = built
    trained = [p for m in method.modules.values() for p in m.parameters() if p.requires_grad]
    dora = [p for m in method.modules.values() for p in dora_parameters(m)]
    assert {id(p) for p in method.parameters()} == {id(p) for p in trained} == {id(p) for p in dora}
    lora = read_lora(run / LORA_FILE)
    assert lora.layout == "diffusers"
    assert set(lora.adapters) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(isinstance(w, DoRAWeights) for a in lora.adapters.values() for w in a.values())
    config_json = json.loads(lora.metadata[DIFFUSERS_METADATA_KEY])
    assert all(config_json[f"{c}.use_dora"] for c in lora.adapters)
    assert lora.metadata["token"] == "rraj" and lora.metadata["steps"] == "3"
    base = load_model(world["model"])
    encoders = {"unet": base.unet, "text_encoder": base.text.text_encoder,
                "text_encoder_2": base.text.text_encoder_2}
    for component, adapters in lora.adapters.items():  # m moved away from ||W0||_c
        modules = dict(encoders[component].named_modules())
        modules |= {f"text_model.{n}": m for n, m in modules.items()}  # CLIP's, either spelling
        moved = [not torch.allclose(w.magnitude, modules[name].weight.flatten(1).norm(dim=1))
                 for name, w in adapters.items()]
        # everywhere but in text_encoder's last layer, which SDXL does not read (its penultimate's)
        assert all(moved) if component == "unet" else sum(moved) >= len(moved) / 2, component
    prompt, kw = "a photo of rraj person", dict(steps=2, seed=0, progress=False)
    method.model.unet.eval()
    with torch.no_grad():
        latents = sample_latents(method.model, prompt, **kw)
    add_loras(base, [(run / LORA_FILE, 1.0)])  # sample.py --lora
    assert rel_err(sample_latents(base, prompt, **kw), latents) < 1e-5
    assert rel_err(sample_latents(load_model(world["model"]), prompt, **kw), latents) > 1e-3


def test_a_resumed_dora_run_is_the_uninterrupted_run(world, tmp_path, monkeypatch):
    uninterrupted = train_like_cli(config(world, tmp_path / "a", dora=True, lora_dropout=0.1))
    resumed = interrupted_then_resumed(config(world, tmp_path / "b", dora=True, lora_dropout=0.1),
                                       monkeypatch)
    state = torch.load(resumed / "checkpoints" / "step-000002.pt")["trained"]["unet"]
    assert any(k.endswith(".lora_magnitude_vector") for k in state)  # m is checkpointed
    assert losses(resumed) == losses(uninterrupted)
    assert same_tensors(read_safetensors(resumed / LORA_FILE)[0],
                        read_safetensors(uninterrupted / LORA_FILE)[0])


def test_plan_with_dora(capsys):
    """The planner builds the method on a meta-device model: DoRA's m adds to what trains."""
    tiny = str(REPO / BUNDLED_MODEL)
    assert train_cli.main(["--model", tiny, "--plan", "--dora", "--no-prior", "--validate-every",
                           "0", "--ema-decay", "0.9"]) == 0
    assert "T4 memory plan" in capsys.readouterr().out
    settings = dict(model=tiny, prior=False, validate_every=0)
    plain, dora = (plan_training(TrainConfig(**settings, dora=d), with_phases=False).step
                   for d in (False, True))
    assert dora.trained > plain.trained and dora.optimizer_states > plain.optimizer_states
