"""The T4 memory planner (minidream/planner/memory.py, fake_run.py) on the bundled tiny model: CI-fast smoke
tests of the byte counting, the CUDA autocast policy, the attention kernel, and `train.py --plan`.
(Its agreement with a real step's memory is measured by benchmarks/planner_validation.py.)"""

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import train
from benchmarks import gpu_check
from minidream.config import TrainConfig, TrainingError, fill_defaults
from minidream.layers import Attention
from minidream.methods.registry import build_method
from minidream.formats.models import BUNDLED_MODEL, REPO
from minidream.planner.memory import optimizer_state_bytes
from minidream.planner import memory, recipes, report
from minidream.quant.linear import QuantLinear, quantised_layers
from minidream.planner.fake_run import FLOP_FORMULAS, ByteCounter, cuda_autocast_policy, fake_tensors

TINY = REPO / BUNDLED_MODEL


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """The tiny model's folder with its config.json files only (what a user has before downloading)."""
    folder = tmp_path_factory.mktemp("configs") / "tiny"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        (folder / part).mkdir(parents=True)
        for file in (TINY / part).glob("*.json"):
            shutil.copy(file, folder / part)
    shutil.copy(TINY / "model_index.json", folder)
    return folder


def test_counter_adds_new_storages_and_frees_them():
    counter = ByteCounter(block=512)
    with fake_tensors(), counter:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes -> 4096 (eight 512-byte blocks)
        assert counter.live == 4096
        view = a[10:].view(10, 99)  # a view shares the storage: nothing new
        b = a * 2
        assert counter.live == 2 * 4096
        del a, view
        assert counter.live == 4096  # a's storage is gone once its last view is
        del b
        assert counter.live == 0 and counter.peak == 2 * 4096


def test_cuda_autocast_policy_upcasts_norms_and_is_undone():
    x, w = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16), torch.ones(32, dtype=torch.bfloat16)
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 8, w).dtype == torch.float32  # CUDA autocast runs group_norm in fp32
        assert F.interpolate(x, scale_factor=2.0).dtype == torch.float32
        assert F.linear(x.flatten(1), torch.randn(4, 2048)).dtype == torch.bfloat16  # matmuls stay low precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 8, w).dtype == torch.bfloat16  # the originals are back


def test_plan_of_the_tiny_model_from_its_configs_alone(config_only):
    cfg = TrainConfig(model=str(config_only), resolution=64, gradient_checkpointing=True, optimizer="adamw")
    plan = memory.plan_training(cfg)
    s = plan.step
    model = memory.meta_model(memory.read_configs(config_only), torch.float16, torch.float16)
    unet_params = sum(p.numel() for p in model.unet.parameters())
    assert s.frozen == 2 * unet_params  # fp16 UNet; the text encoders are offloaded (cached prompts)
    lora_values = s.trained // 4
    assert s.gradients == s.trained and 0 < lora_values < unet_params // 10
    assert s.optimizer_states == 8 * lora_values  # torch AdamW: two fp32 moments
    assert s.optimizer_temp == 4 * lora_values  # its CUDA foreach step: one sqrt(v) for all values
    assert s.activations > 0 and s.peak_forward_backward > s.frozen + s.trained + s.optimizer_states
    assert s.flops > 0
    assert s.attention == ["fused flash attention (CPU)"]  # never the math kernel's L x L scores
    assert set(plan.phases) >= {"latent cache: VAE encode", "class images: VAE decode", "validation: VAE decode"}
    assert plan.fits and plan.predicted > memory.MARGIN_FIXED_GIB * memory.GiB
    text = report.format_plan(plan)
    assert "fits a T4" in text and "s/step" in text


def step_plan(cfg: TrainConfig) -> memory.StepMemory:
    """Only the training step of plan_training (no sampling phases): cheaper for the tests."""
    fill_defaults(cfg, 64)
    precision, _ = memory.t4_precision(cfg.precision)
    model = memory.meta_model(memory.read_configs(cfg.model), precision.weight_dtype, precision.weight_dtype,
                              cfg.base_weights)
    return memory.plan_step(model, build_method(model, cfg, "sks", "person"), cfg, precision, fake_tensors())


@pytest.mark.parametrize("base", ["int8", "nf4"])
def test_quantised_step_counts_codes_and_scales(config_only, base):
    """The planned UNet holds QuantLinear buffers of load_weights' dtypes and shapes: the step's
    frozen bytes are those buffers plus the layers left unquantised, less than an fp16 base's."""
    cfg = dict(model=str(config_only), resolution=64, gradient_checkpointing=True)
    plain, quantised = step_plan(TrainConfig(**cfg)), step_plan(TrainConfig(**cfg, base_weights=base))
    model = memory.meta_model(memory.read_configs(config_only), torch.float16, torch.float16, base)
    layers = [layer for _, layer in quantised_layers(model.unet)]
    codes = {layer.weight_codes.dtype for layer in layers}
    assert layers and codes == {torch.int8 if base == "int8" else torch.uint8}
    buffers = sum(memory.tensor_bytes([layer]) for layer in layers)  # codes + scales (+ biases)
    rest = [t for n, t in (*model.unet.named_parameters(), *model.unet.named_buffers())
            if not isinstance(model.unet.get_submodule(n.rpartition(".")[0]), QuantLinear)]
    assert quantised.frozen == buffers + memory.tensor_bytes(None, rest) < plain.frozen
    assert quantised.trained == plain.trained  # the same adapters train on top


def test_text_encoder_lora_and_full_fine_tuning_cost_more(config_only):
    base = dict(model=str(config_only), resolution=64, gradient_checkpointing=False)
    lora = step_plan(TrainConfig(**base))
    text = step_plan(TrainConfig(**base, train_text_encoder=True))
    full = step_plan(TrainConfig(**base, method="full"))
    assert text.frozen > lora.frozen and text.trained > lora.trained  # encoders on the GPU, their adapters train
    assert full.frozen == 0 and full.trained == 2 * lora.frozen  # the whole UNet, fp32 instead of fp16
    model = memory.meta_model(memory.read_configs(config_only), torch.float16, torch.float16)
    assert full.optimizer_states == optimizer_state_bytes(list(model.unet.parameters()), "adamw8bit")
    assert full.activations > lora.activations  # the autocast cache holds fp16 copies of every fp32 weight


def test_plan_cli(config_only, capsys):
    assert train.main(["--model", str(config_only), "--plan", "--no-prior", "--validate-every", "0"]) == 0
    assert "T4 memory plan" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="textual"):
        memory.plan_training(TrainConfig(model=str(config_only), method="textual-inversion"))


def test_flop_count_equals_torch_flop_counter():
    torch.manual_seed(0)
    attn = Attention(64, heads=2, head_dim=32, context_dim=48)
    x, ctx = torch.randn(2, 16, 64, requires_grad=True), torch.randn(2, 7, 48)
    cpu_attention = {op: f for op, f in FLOP_FORMULAS.items() if "for_cpu" in str(op)}
    reference, counter = FlopCounterMode(display=False, custom_mapping=cpu_attention), ByteCounter()
    with reference:
        attn(x, ctx).sum().backward()
    with counter:
        attn(x, ctx).sum().backward()
    # forward: q, k, v, out projections + attention; backward: about twice that
    assert counter.flops == reference.get_total_flops() > 3 * 2 * 2 * 16 * 64 * 64


def test_search_drops_checkpointing_where_the_step_fits(config_only):
    """The tiny model fits a 16 GB card every way: the fastest recipe wins, without checkpointing
    (though the config had it on), without quantising, untiled; the output says predicted."""
    cfg = TrainConfig(model=str(config_only), resolution=64, gradient_checkpointing=True)
    found = recipes.search(cfg, 16)
    assert len(found.plans) == 18 and all(p.fits for p in found.plans)
    assert recipes.recipe_flags(found.chosen.cfg) == "--no-gradient-checkpointing --base-weights fp16 --vae-tiling 0"
    assert found.changes() == {"gradient_checkpointing": False}
    text = recipes.format_search(found)
    assert "predicted" in text and "chosen, the fastest that fits" in text and "15.00 GiB usable" in text


def test_explicit_flags_win(config_only, capsys):
    cfg = TrainConfig(model=str(config_only), resolution=64, base_weights="nf4", vae_tiling=256, gpu_memory=8)
    changes, lines = recipes.choose_recipe(cfg, explicit={"base_weights", "vae_tiling"})
    assert changes == {}  # no checkpointing: the tiny model's preset already
    assert "kept as you passed them: --base-weights nf4, --vae-tiling 256" in lines[-1]
    assert recipes.usable_gib(16) == memory.T4_USABLE_GIB and recipes.usable_gib(8) == 7.5
    assert train.main(["--model", str(config_only), "--plan", "--gpu-memory", "6", "--no-prior",
                       "--validate-every", "0", "--base-weights", "int8"]) == 0
    out = capsys.readouterr().out
    assert "--gpu-memory 6: 5.62 GiB usable" in out and "predicted" in out and "base weights int8" in out
    with pytest.raises(TrainingError, match="--gpu-memory"):
        recipes.search(cfg, 0)


def test_time_phases_sum_to_the_run_and_scale_with_class_steps():
    """estimate_time on a hand-made plan (no fake run): the phases sum to the whole run; the class
    images' UNet part is linear in class_steps; batching class images changes no FLOP count."""
    def timing(quantised=0, **settings):
        cfg = TrainConfig(model="x", steps=100, num_class_images=10, class_steps=20, class_batch=0,
                          validate_every=50, validation_steps=10, base_weights="fp16")
        cfg = dataclasses.replace(cfg, **settings)
        step = memory.StepMemory(0, 4 * 10**6, 0, 0, 0, 0, 0, 0, 0, flops=3 * 10**12)
        flops = {"unet_guidance": 10**12, "vae_encode": 2 * 10**12, "vae_decode": 4 * 10**12}
        plan = memory.MemoryPlan("hand-made", step, {}, cfg=cfg, flops=flops, quantised_weights=quantised)
        return recipes.estimate_time(plan)

    full = timing()
    assert list(full.phases) == ["class images", "latent cache", "training steps", "validation"]
    assert full.run_s == pytest.approx(sum(full.phases.values())) and min(full.phases.values()) > 0
    decodes_only = timing(class_steps=0).phases["class images"]
    half = timing(class_steps=10)
    assert half.phases["class images"] - decodes_only == pytest.approx(
        (full.phases["class images"] - decodes_only) / 2)
    assert {k: v for k, v in half.phases.items() if k != "class images"} == \
        {k: v for k, v in full.phases.items() if k != "class images"}
    assert timing(class_batch=4).phases == full.phases  # FLOPs per image: batching changes nothing
    int8 = {k: timing(10**9, base_weights="int8", class_batch=k).phases["class images"] for k in (0, 4)}
    assert full.phases["class images"] < int8[4] < int8[0]  # ... but the dequantisation is shared
    assert timing(prior=False).phases["class images"] == 0 == timing(validate_every=0).phases["validation"]


@pytest.mark.slow
def test_sdxl_recipes_for_8_and_6_gb():
    """SDXL at 1024 px, rank 4, prior batch, checkpointing on (passed): the whole run is predicted
    to fit 8 GB with an int8 base and 6 GB with nf4 (both with a tiled VAE); fp16 fits neither."""
    cfg, runs = TrainConfig(model=str(REPO / "configs" / "sdxl-base-1.0"), gradient_checkpointing=True), {}
    eight = recipes.search(cfg, 8, {"gradient_checkpointing"}, runs)
    six = recipes.search(cfg, 6, {"gradient_checkpointing"}, runs)
    assert eight.chosen.cfg.base_weights == "int8" and eight.chosen.predicted <= 7.5 * memory.GiB
    assert six.chosen.cfg.base_weights == "nf4" and six.chosen.predicted <= recipes.usable_gib(6) * memory.GiB
    assert (eight.chosen.cfg.vae_tiling, six.chosen.cfg.vae_tiling) == (gpu_check.RECIPE_TILES["int8"],
                                                                  gpu_check.RECIPE_TILES["nf4"])  # gpu_check runs these
    assert not any(p.fits for p in eight.plans if p.cfg.base_weights == "fp16")


def test_ema_adds_an_fp32_copy_of_what_trains(config_only):
    """--ema-decay keeps an fp32 average of every trained value on the GPU, beside the optimizer states."""
    cfg = dict(model=str(config_only), resolution=64, gradient_checkpointing=True)
    plain, with_ema = step_plan(TrainConfig(**cfg)), step_plan(TrainConfig(**cfg, ema_decay=0.99))
    assert with_ema.optimizer_states - plain.optimizer_states == plain.trained > 0  # fp32 trained values
