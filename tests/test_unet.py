"""minidream's UNet against diffusers' UNet2DConditionModel: same keys, same shapes, same numbers.

Relative error everywhere: max|ours - ref| / max|ref|, computed in fp32.
"""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from minidream.unet import UNet, UNetConfig
from tests._model_factory import (
    TINY_SD1_UNET, TINY_SD2_UNET, TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET, load_minidream, perturb_,
    rel_err, save_diffusers, sdxl_config,
)

TOL = 1e-5
FAMILIES = {"sdxl": TINY_SDXL_UNET, "sd1": TINY_SD1_UNET, "sd2": TINY_SD2_UNET}


def _inputs(config, batch=2, height=16, width=16, seed=0):
    """Random (x, context) and, for text_time configs, (pooled, time_ids) with real-looking sizes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], height, width, generator=g)
    context = torch.randn(batch, 7, config["cross_attention_dim"], generator=g)
    added = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = torch.randn(batch, TINY_SDXL_POOLED_DIM, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1360, 64, 32, 1024, 1024]])[:batch]
        added = {"pooled": pooled, "time_ids": time_ids}
    return x, context, added


def _reference(ref, x, t, context, added):
    kwargs = {}
    if added:
        kwargs["added_cond_kwargs"] = {"text_embeds": added["pooled"], "time_ids": added["time_ids"]}
    return ref(x, t, encoder_hidden_states=context, **kwargs).sample


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, config dict, diffusers model, minidream model loaded from diffusers' save_pretrained)."""
    config = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param) / "unet"
    ref = save_diffusers(UNet2DConditionModel, config, folder, seed=0)
    ours = load_minidream(UNet, UNetConfig, folder)
    return request.param, config, ref, ours


@pytest.mark.parametrize(
    "t", [torch.tensor([10, 999]), 500, 250.5, torch.tensor(999)], ids=["batch", "int", "float", "0d"]
)
def test_unet_matches_diffusers(pair, t):
    _, config, ref, ours = pair
    x, context, added = _inputs(config)
    with torch.no_grad():
        expected = _reference(ref, x, t, context, added)
        got = ours(x, t, context, **added)
    assert got.shape == expected.shape == x.shape
    assert rel_err(got, expected) <= TOL


def test_unet_matches_diffusers_on_odd_latent_size(pair):
    # 18 x 14 is not a multiple of 2**(levels-1): upsampling must follow the skip sizes.
    _, config, ref, ours = pair
    x, context, added = _inputs(config, height=18, width=14)
    with torch.no_grad():
        expected = _reference(ref, x, 321, context, added)
        got = ours(x, 321, context, **added)
    assert got.shape == x.shape
    assert rel_err(got, expected) <= TOL


def test_micro_conditioning_changes_the_output():
    # The time ids really enter the SDXL UNet (a wrong wiring that ignored them would pass parity
    # only if diffusers ignored them too; this guards the test inputs themselves).
    torch.manual_seed(0)
    model = perturb_(UNet(UNetConfig.from_dict(TINY_SDXL_UNET)), seed=1).eval()
    x, context, added = _inputs(TINY_SDXL_UNET)
    with torch.no_grad():
        a = model(x, 10, context, **added)
        b = model(x, 10, context, added["pooled"], added["time_ids"] + 64)
    assert rel_err(a, b) > 1e-3


def _shapes(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_full_size_sdxl_unet_has_diffusers_names_and_shapes():
    config = sdxl_config("unet")
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)
        ours = UNet(UNetConfig.from_dict(config))
    ours_shapes, ref_shapes = _shapes(ours), _shapes(ref)
    missing, extra = ref_shapes.keys() - ours_shapes.keys(), ours_shapes.keys() - ref_shapes.keys()
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    bad = [k for k in ref_shapes if ours_shapes[k] != ref_shapes[k]]
    assert not bad, f"shape mismatch: {[(k, ours_shapes[k], ref_shapes[k]) for k in bad[:5]]}"
    assert len(ours_shapes) == 1680
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684


# The keys by which the real SD 1.5 and SD 2.1 unet/config.json differ from diffusers' defaults.
SD15_UNET = {"attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}
SD21_UNET = {
    "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
    "use_linear_projection": True, "upcast_attention": True,
}


@pytest.mark.parametrize("config", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_sd1_sd2_unets_have_diffusers_names_and_shapes(config):
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
        ours = UNet(UNetConfig.from_dict(config))
    assert _shapes(ours) == _shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_config_defaults_are_sdxl_base():
    assert UNetConfig.from_dict(sdxl_config("unet")) == UNetConfig()


def test_keys_missing_from_config_json_take_diffusers_defaults():
    # Old SD 1.5 config.json files omit addition_embed_type, transformer_layers_per_block, ...:
    # they mean diffusers' defaults (an SD 1.x UNet), never minidream's SDXL dataclass defaults.
    with torch.device("meta"):
        ref = UNet2DConditionModel()
        ours = UNet(UNetConfig.from_dict({"_class_name": "UNet2DConditionModel"}))
    assert _shapes(ours) == _shapes(ref)
    assert ours.add_embedding is None


def _grads(model, x, context, added, upstream):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, torch.tensor([10, 999]), context, **added)
    out.backward(upstream)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _saved_tensor_count(model, x, context, added):
    """How many tensors autograd keeps for backward (checkpointing must lower it)."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_(True), 10, context, **added)
    return count


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    model = perturb_(UNet(UNetConfig.from_dict(TINY_SDXL_UNET)), seed=2).train()
    x, context, added = _inputs(TINY_SDXL_UNET, seed=3)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    out_off, gx_off, g_off = _grads(model, x, context, added, upstream)
    saved_off = _saved_tensor_count(model, x.clone(), context, added)
    model.enable_gradient_checkpointing(True)
    out_on, gx_on, g_on = _grads(model, x, context, added, upstream)
    saved_on = _saved_tensor_count(model, x.clone(), context, added)

    assert saved_on < saved_off / 2, "checkpointing did not reduce the saved activations"
    assert torch.equal(out_on, out_off)
    assert torch.equal(gx_on, gx_off)
    assert g_on.keys() == g_off.keys() and len(g_on) == len(list(model.parameters()))
    for name in g_off:
        assert torch.equal(g_on[name], g_off[name]), name


def test_gradient_checkpointing_trains_adapters_of_a_frozen_unet():
    # The LoRA case: base frozen, input without grad, only attention projections trainable. The
    # non-reentrant checkpoint must still deliver their gradients.
    torch.manual_seed(0)
    model = perturb_(UNet(UNetConfig.from_dict(TINY_SDXL_UNET)), seed=5).train()
    for name, p in model.named_parameters():
        p.requires_grad_(".to_q." in name or ".to_v." in name)
    x, context, added = _inputs(TINY_SDXL_UNET, seed=6)
    results = []
    for on in (False, True):
        model.enable_gradient_checkpointing(on)
        model.zero_grad(set_to_none=True)
        model(x, 500, context, **added).square().mean().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(results[1]) > 0 and all(g is not None and g.abs().sum() > 0 for g in results[1].values())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize(
    "change, match",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"dual_cross_attention": True}, "dual_cross_attention"),
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"not_a_unet_key": 1}, "unknown key"),
        ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}, "not impl"),
        ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "one entry per level"),
        ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block"),
        ({"transformer_layers_per_block": [[1, 1], [2, 2], [3, 3]]}, "transformer_layers_per_block"),
        ({"attention_head_dim": [3, 4, 4]}, "attention heads"),
        ({"cross_attention_dim": [24, 24, 24]}, "cross_attention_dim"),
        ({"projection_class_embeddings_input_dim": None}, "projection_class_embeddings_input_dim"),
    ],
)
def test_unsupported_or_broken_unet_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", **TINY_SDXL_UNET, **change})


def test_harmless_diffusers_keys_are_accepted():
    config = UNetConfig.from_dict({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0", **TINY_SD1_UNET,
        "act_fn": "silu", "addition_embed_type_num_heads": 64, "mid_block_only_cross_attention": None,
    })
    assert dataclasses.asdict(config)["use_linear_projection"] is False


def test_unet_forward_errors_name_the_problem():
    torch.manual_seed(0)
    sdxl = UNet(UNetConfig.from_dict(TINY_SDXL_UNET)).eval()
    sd1 = UNet(UNetConfig.from_dict(TINY_SD1_UNET)).eval()
    x, context, added = _inputs(TINY_SDXL_UNET)
    with torch.no_grad():
        with pytest.raises(ValueError, match="pooled"):
            sdxl(x, 10, context)
        with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
            sdxl(x, 10, context, added["pooled"][:, :-1], added["time_ids"])
        with pytest.raises(ValueError, match="no added embedding"):
            sd1(x, 10, torch.randn(2, 7, TINY_SD1_UNET["cross_attention_dim"]), **added)
        with pytest.raises(ValueError, match="timesteps"):
            sdxl(x, torch.tensor([1, 2, 3]), context, **added)
