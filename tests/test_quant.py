"""minidream/quant: int8 and NF4 weights against hand computations and the QLoRA paper's table, a
quantised Linear under LoRA against a plain Linear, the tiny model loaded quantised, and a LoRA
trained on an nf4 base sampled on the full-precision base."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import minidream.training as training
from minidream import formats
from minidream.cli.args import check_sample_args, sample_parser
from minidream.cli.sample_command import load
from minidream.config import LORA_FILE, TrainConfig, TrainingError, check_config, fill_defaults
from minidream.formats.lora_files import add_loras
from minidream.formats.lora_stack import merge_layer, stack_layers
from minidream.lora import LoRALinear, inject_lora
from minidream.pipeline import generate
from minidream.formats.loading import TensorMaps
from minidream.quant import int8
from minidream.quant.int8 import dequantise_int8, quantise_int8
from minidream.quant.linear import LoRAQuantLinear, QuantLinear, quantise_linear, quantised_layers
from minidream.quant.nf4 import LEVELS, dequantise_nf4, nf4_levels, pack, quantise_nf4, unpack
from minidream.formats.models import BUNDLED_MODEL, REPO
from minidream.toy.tiny import write_tiny_sdxl

BUNDLED = REPO / BUNDLED_MODEL

# NF4 as published: QLoRA (Dettmers et al. 2023) appendix E, = bitsandbytes' get_4bit_type("nf4")
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_levels_are_the_published_table():
    assert torch.allclose(nf4_levels(), torch.tensor(NF4_TABLE), atol=1e-6)
    assert nf4_levels()[7] == 0 and (nf4_levels().diff() > 0).all()


def test_nf4_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert torch.allclose(LEVELS, bnb.get_4bit_type("nf4", device="cpu"), atol=1e-6)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    packed, absmax = quantise_nf4(w)
    try:
        codes, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    except (RuntimeError, NotImplementedError) as e:  # a build without CPU 4-bit kernels
        pytest.skip(f"bitsandbytes cannot quantise on CPU here: {e}")
    assert torch.equal(codes.flatten(), packed) and torch.equal(state.absmax, absmax)


def test_int8_round_trip_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0], [2.0, 1.0, -0.01, 0.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scales = quantise_int8(w)
    # row 0: absmax 1 -> 127 * [0.5, -1, 0.25, 0] = [63.5, -127, 31.75, 0] -> round half to even
    assert codes.tolist() == [[64, -127, 32, 0], [127, 64, -1, 0], [0, 0, 0, 0]]
    assert torch.equal(scales, torch.tensor([[1 / 127], [2 / 127], [0.0]]))
    assert torch.equal(dequantise_int8(codes, scales), codes.float() * scales)
    assert (dequantise_int8(codes, scales) - w).abs().max() <= 2 / 127 / 2 + 1e-7


def test_pack_two_codes_per_byte():
    codes = torch.tensor([1, 2, 15, 0, 7, 8], dtype=torch.uint8)
    packed = pack(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x78]  # the even code in the high nibble
    assert torch.equal(unpack(packed), codes)
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack(unpack(every)), every)


def test_nf4_round_trip_by_hand():
    levels = torch.tensor(NF4_TABLE)
    block = torch.zeros(64)
    block[:5] = torch.tensor([-2.0, 1.0, 0.4, 0.17, 0.0])  # absmax 2 -> [-1, .5, .2, .085, 0]
    w = torch.cat([block, torch.zeros(64)]).view(4, 32)  # two blocks, the second all zeros
    packed, absmax = quantise_nf4(w)
    assert packed.shape == (64,) and packed.dtype == torch.uint8
    assert absmax.tolist() == [2.0, 0.0]
    codes = unpack(packed)
    # nearest levels by hand: -1 -> 0; 0.5 -> 0.4407 (12); 0.2 -> 0.1609 (9); 0.085 -> 0.0796 (8)
    assert codes[:5].tolist() == [0, 12, 9, 8, 7] and (codes[5:] == 7).all()
    want = (levels[codes.long()].view(2, 64) * absmax[:, None]).view(4, 32)
    torch.testing.assert_close(dequantise_nf4(packed, absmax, (4, 32)), want, rtol=0, atol=1e-6)


def test_nf4_pads_a_last_partial_block_and_bounds_the_error():
    w = torch.randn(5, 30)  # 150 weights: 3 blocks, the last one padded
    packed, absmax = quantise_nf4(w)
    assert packed.shape == (96,) and absmax.shape == (3,)
    back = dequantise_nf4(packed, absmax, w.shape)
    gap = (torch.tensor(NF4_TABLE).diff().max() / 2).item()  # the widest half-gap between levels
    per_weight = absmax[torch.arange(150) // 64].view(5, 30)  # each weight's block absmax
    assert ((back - w).abs() <= gap * per_weight + 1e-6).all()


def whole_tensor_int8(w):  # quantise_int8 before chunking: the whole W in fp32 at once
    scales = w.float().abs().amax(dim=1, keepdim=True) / 127
    codes = torch.round(w.float() / scales.clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
    return codes, scales.to(w.dtype)


def whole_tensor_nf4(w):  # quantise_nf4 before chunking
    flat = w.float().flatten()
    blocks = F.pad(flat, (0, -flat.numel() % 64)).view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    codes = torch.bucketize(blocks / absmax.clamp_min(1e-30), (LEVELS[1:] + LEVELS[:-1]) / 2)
    return pack(codes.flatten()), absmax.flatten().to(w.dtype)


@pytest.mark.parametrize("chunk", [64, 2**14, 2**40])  # 2**40: one chunk, the whole tensor
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_chunked_quantisation_gives_the_whole_tensor_codes_bit_for_bit(chunk, dtype, monkeypatch):
    monkeypatch.setattr(int8, "CHUNK", chunk)  # nf4 reads it too
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4), (5, 30), (640, 320), (2**14 + 7, 3), (7, 2**14 + 1), (1, 2**15 + 197)]:
        w32 = torch.randn(shape, generator=g) * 0.02
        w32[0, :2], w32.view(-1)[-1] = torch.tensor([0.0, -0.0]), 0.0  # zeros and signed zeros
        w32[-1] = 0  # an all-zero row
        w = w32.to(dtype)  # as load_weights passes a weight to cast: each chunk cast alone
        for ours, whole in ((quantise_int8(w), whole_tensor_int8(w)),
                            (quantise_int8(w32, dtype), whole_tensor_int8(w)),
                            (quantise_nf4(w), whole_tensor_nf4(w)),
                            (quantise_nf4(w32, dtype), whole_tensor_nf4(w))):
            for a, b in zip(ours, whole):  # the same bytes: dtype, shape and every bit
                assert a.dtype == b.dtype and a.shape == b.shape, (shape, a.dtype, b.dtype)
                assert torch.equal(a.reshape(-1).view(torch.uint8),
                                   b.reshape(-1).view(torch.uint8)), shape


def test_tensor_maps_read_what_safe_open_reads(tmp_path):
    """TensorMaps (a quantised load's reader, one map per tensor) against safetensors' safe_open:
    the same bytes, dtype and shape for every dtype, and rows slices too."""
    tensors = {"a": torch.randn(6, 5).half(), "b": torch.randn(3).bfloat16(), "c": torch.arange(7),
               "d": torch.randn(4, 4).to(torch.float8_e4m3fn), "e": torch.tensor([True, False]),
               "f": torch.randn(9, 2, 2), "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    with open(path, "rb") as file, safe_open(str(path), framework="pt") as mapped:
        maps = TensorMaps(file)
        read = [(maps.get_tensor(k), mapped.get_tensor(k), tensors[k]) for k in tensors]
        read.append((maps.get_slice("f")[3:6], mapped.get_slice("f")[3:6], tensors["f"][3:6]))
        for ours, theirs, want in read:
            assert ours.dtype == theirs.dtype == want.dtype and ours.shape == want.shape
            assert torch.equal(ours.reshape(-1).view(torch.uint8),
                               theirs.reshape(-1).view(torch.uint8))
            assert torch.equal(ours.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_lora_on_a_quantised_linear_equals_lora_on_its_dequantised_weight(fmt):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    quant = quantise_linear(nn.Linear(64, 48), base.weight.detach(), fmt)
    quant.bias = base.bias
    assert type(quant) is QuantLinear and "weight" not in dict(quant.named_parameters())
    plain = nn.Linear(64, 48)
    plain.weight.data, plain.bias.data = quant.weight.clone(), base.bias.detach().clone()
    for layer in (quant, plain):
        layer.requires_grad_(False)
        torch.manual_seed(1)
        inject_lora(nn.Sequential(layer), ("0",), rank=4)
        nn.init.normal_(layer.lora_B.weight)  # B != 0 so that A gets a gradient
    assert type(quant) is LoRAQuantLinear and type(plain) is LoRALinear
    x = torch.randn(3, 7, 64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [layer(xi) for layer, xi in zip((quant, plain), xs)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-6, atol=1e-6)
    for y in ys:
        (y.square().mean()).backward()
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(quant, name).weight.grad,
                                   getattr(plain, name).weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-7)


def test_quantised_weight_is_not_kept_for_backward():
    """QuantMatmul saves the layer, not W: the autograd graph holds no (out, in) tensor."""
    layer = quantise_linear(nn.Linear(256, 256, bias=False), torch.randn(256, 256), "nf4")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(2, 256, requires_grad=True)).sum().backward()
    assert (256, 256) not in saved


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("quant") / "tiny-sdxl")


def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
            torch.randn(2, pooled, generator=g), torch.tensor([[64, 64, 0, 0, 64, 64]] * 2))


@pytest.mark.parametrize("fmt, limit", [("int8", 0.01), ("nf4", 0.1)])
def test_bundled_model_loads_quantised_and_stays_close(fmt, limit):
    """Relative error of the bundled (trained) tiny UNet's output vs fp32, measured: int8 0.0033,
    nf4 0.055 (fp16 weights: 0.0007). One layer's NF4 weight error is ~9% on normal weights."""
    full = formats.load_unet(BUNDLED)
    quant = formats.load_unet(BUNDLED, base_weights=fmt)
    linears = [n for n, m in full.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in quantised_layers(quant)] == linears
    assert not any(p.device.type == "meta" for p in quant.parameters())
    with torch.no_grad():
        want, got = full(*unet_inputs(full)), quant(*unet_inputs(quant))
    error = ((got - want).norm() / want.norm()).item()
    assert error < limit, f"{fmt}: relative error {error:.4f}"
    model = formats.load_model(BUNDLED, base_weights=fmt)  # only the UNet is quantised
    assert quantised_layers(model.unet) and not quantised_layers(model.vae)
    assert not quantised_layers(model.text.text_encoder)


def test_full_finetuning_refuses_a_quantised_base(tiny):
    cfg = TrainConfig(model=str(tiny), method="full", base_weights="nf4")
    fill_defaults(cfg, 64)
    with pytest.raises(TrainingError, match="--base-weights nf4"):
        check_config(cfg)


def test_lora_trained_on_nf4_base_samples_on_the_full_base(tiny, tmp_path):
    subject = tmp_path / "raj"
    subject.mkdir()
    (subject / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    for i in range(2):
        Image.new("RGB", (72, 72), (90 * i, 120, 200)).save(subject / f"{i}.png")
    cfg = TrainConfig(subject=str(subject), model=str(tiny), out=str(tmp_path / "runs"), steps=4,
                      base_weights="nf4", class_dir=str(tmp_path / "class"), num_class_images=1,
                      class_steps=2, validate_every=2, validation_steps=2, save_every=0,
                      log_every=1, views_per_image=1, optimizer="adamw")
    run = training.train(cfg, models=formats)
    lora = run / LORA_FILE
    model = formats.load_model(tiny)  # fp32 base
    add_loras(model, [(lora, 1.0)])
    assert generate(model, ["a photo of rraj person"], steps=2, height=64, width=64,
                    progress=False)[0].size == (64, 64)
    args = sample_parser("sample.py").parse_args(["--prompt", "a photo of rraj person", "--lora",
                                                   str(lora), "--base-weights", "nf4"])
    quant, _ = load(args, check_sample_args(args), tiny, "fp32", "cpu")  # sample.py's loading
    layers = dict(stack_layers(quant.unet))
    assert quantised_layers(quant.unet) and layers and not any(m.merged for m in layers.values())
    with pytest.raises(ValueError, match="quantised"):
        merge_layer(next(layer for layer in layers.values() if isinstance(layer, QuantLinear)))
    assert generate(quant, ["a photo of rraj person"], steps=2, height=64, width=64,
                    progress=False)[0].size == (64, 64)
