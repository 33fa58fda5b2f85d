"""train.py --method full (minidream.methods.full_finetune, model_folder): one step against diffusers'
UNet2DConditionModel + torch AdamW, the fp16 recipe's fp32 master weights, the saved model folder
(loaded by minidream and by diffusers, from a folder and from a single-file base), exact resume,
and the parameter plan the T4 memory planner reads."""

import json
import shutil
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from minidream.method import text_encoders
from minidream.methods.registry import build_method
from minidream.methods.full_finetune import FullFinetune
from minidream import formats
from minidream.formats.models import load_model
from minidream.optim import make_optimizer
from minidream.planner.memory import optimizer_state_bytes
from minidream.schedule import alphas_cumprod
from minidream.step import Batch, apply_gradients, training_step
from minidream.toy.tiny import write_tiny_sdxl
from minidream.config import TrainConfig
from _train import train_like_cli as train
from tests.checkpoint_fixtures import reference_models, write_single_file
from tests.test_distributed import losses, write_subject
from tests.test_training_step import SCHEDULE, make_batch, reference_step, reference_unet, rel_err, unet_under_test

ROOT = Path(__file__).resolve().parent.parent
NO_TEXT = SimpleNamespace(text_encoder=None, text_encoder_2=None)


def test_one_full_step_equals_diffusers_unet_and_torch_adamw():
    lr, wd, max_norm = 2e-6, 1e-2, 0.05  # the T4 recipe's lr; a small max norm, so clipping is exercised
    ref = reference_unet()
    ours = unet_under_test(ref)
    method = FullFinetune(SimpleNamespace(unet=ours, text=NO_TEXT), TrainConfig(method="full", lr=lr,
                          gradient_checkpointing=False), "rraj", "person")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    batch, prompts = make_batch()

    ref_loss, ref_grads = reference_step(ref, batch, prompts, "epsilon", None, lr, wd, max_norm, trained=lambda n: True)

    optimizer, _ = make_optimizer(method.param_groups(), "adamw", lr=lr, weight_decay=wd)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses_ = training_step(ours, batch, lambda: prompts, alphas_cumprod(SCHEDULE), scaler=scaler)
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    norm, applied = apply_gradients(optimizer, method.parameters(), scaler, max_grad_norm=max_norm)
    assert applied and norm > max_norm  # clipping was active

    ref_params = dict(ref.named_parameters())
    assert set(grads) == set(ref_grads) == set(ref_params)  # every UNet weight trains
    loss_err = abs(losses_.loss.item() - ref_loss.item()) / abs(ref_loss.item())
    grad_scale = max(g.abs().max() for g in ref_grads.values())
    grad_err = (max((grads[n] * max_norm / (norm + 1e-6) - ref_grads[n]).abs().max() for n in grads) / grad_scale).item()
    weight_err = max(rel_err(p.detach(), ref_params[n].detach()) for n, p in ours.named_parameters())
    moved = [n for n, p in ours.named_parameters() if not torch.equal(p, before[n])]
    print(f"full step: loss rel {loss_err:.1e}, grad rel (to the largest) {grad_err:.1e}, "
          f"updated weights rel {weight_err:.1e}, {len(moved)}/{len(before)} tensors moved")
    assert loss_err <= 1e-5 and weight_err <= 1e-5 and grad_err <= 1e-5
    assert len(moved) == len(before)


def test_fp16_recipe_keeps_fp32_master_weights(tmp_path):
    """Loaded in fp16 (as on a T4): the UNet becomes fp32 and trains under fp16 autocast with loss
    scaling; the frozen text encoders stay fp16. Gradients are fp32, the update lands."""
    model = load_model(write_tiny_sdxl(tmp_path / "tiny", dtype=torch.float32), torch.float16)
    method = FullFinetune(model, TrainConfig(method="full", lr=1e-4, gradient_checkpointing=True), "rraj", "person")
    params = method.parameters()
    assert len(params) == len(list(model.unet.parameters())) and all(p.dtype == torch.float32 for p in params)
    assert model.text.text_encoder.dtype == model.text.text_encoder_2.dtype == torch.float16
    assert method.save_dtype == torch.float16  # the model folder is written in the run's dtype
    optimizer, _ = make_optimizer(method.param_groups(), "adamw", lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([37, 612]),
                  torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), torch.tensor([0, 1]), num_instance=1)
    prompts = (torch.randn(2, 77, 192, generator=g).half(), torch.randn(2, 128, generator=g).half())
    before = [p.detach().clone() for p in params]
    losses_ = training_step(model.unet, batch, lambda: prompts, alphas_cumprod(model.schedule),
                            autocast_dtype=torch.float16, scaler=scaler)
    assert all(p.grad.dtype == torch.float32 for p in params)
    _, applied = apply_gradients(optimizer, params, scaler, max_grad_norm=1.0)
    assert applied and torch.isfinite(losses_.loss)
    assert sum(not torch.equal(p, b) for p, b in zip(params, before)) > 0.9 * len(params)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    write_subject(root)
    cfg = dict(subject=str(root / "raj"), model=str(ROOT / "weights/tiny-sdxl"), out=str(root / "runs"),
               method="full", steps=3, prior=False, validate_every=0, save_every=1, keep_checkpoints=0, log_every=1,
               views_per_image=1, optimizer="adamw")
    return train(TrainConfig(**cfg))


def test_full_run_writes_a_model_folder_minidream_and_diffusers_load(full_run):
    folder, base = full_run / "model", ROOT / "weights/tiny-sdxl"
    state = torch.load(full_run / "checkpoints" / "step-000003.pt", weights_only=True)["trained"]["unet"]
    ours = load_model(folder)
    assert all(torch.equal(v, state[k]) for k, v in ours.unet.state_dict().items())  # written as trained (fp32 here)
    base_unet = load_model(base).unet.state_dict()
    assert all(not torch.equal(v, base_unet[k]) for k, v in state.items() if v.numel() > 100)
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/vocab.json"):
        assert (folder / part).read_bytes() == (base / part).read_bytes()  # untouched: linked (or copied)
    assert json.loads((folder / "model_index.json").read_text()) == json.loads((base / "model_index.json").read_text())
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    theirs = pipe.unet.state_dict()
    assert set(theirs) == set(state) and all(torch.equal(theirs[k], v) for k, v in state.items())
    assert not (full_run / "checkpoints" / "step-000003.safetensors").exists()  # no model copy per checkpoint


def test_full_run_resumes_exactly(full_run, tmp_path):
    resumed = tmp_path / full_run.name
    shutil.copytree(full_run, resumed)
    shutil.rmtree(resumed / "model")
    for step in (2, 3):
        (resumed / "checkpoints" / f"step-00000{step}.pt").unlink()
    train(TrainConfig(resume=str(resumed)))
    assert losses(resumed) == losses(full_run)
    a, b = (load_file(r / "model" / "unet" / "diffusion_pytorch_model.safetensors") for r in (resumed, full_run))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_saving_from_a_single_file_base_writes_every_part(tmp_path):
    folder = write_tiny_sdxl(tmp_path / "tiny", seed=2, dtype=torch.float32)
    single = tmp_path / "tiny.safetensors"
    write_single_file(reference_models(folder), single)
    model = formats.load_model(single, tokenizer=folder)  # single files carry no tokenizer: --tokenizer
    method = FullFinetune(model, TrainConfig(method="full", tokenizer=str(folder), gradient_checkpointing=False),
                          "rraj", "person")
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)  # as if trained
    saved = method.save(tmp_path / "model", step=1)
    again, base = load_model(saved), load_model(folder)
    assert torch.equal(again.unet.conv_in.weight, model.unet.conv_in.weight)
    parts = {"vae": lambda m: m.vae, "text_encoder": lambda m: m.text.text_encoder,
             "text_encoder_2": lambda m: m.text.text_encoder_2}
    for part, get in parts.items():
        mine, theirs = get(again).state_dict(), get(base).state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(v, theirs[k]) for k, v in mine.items()), part
    pipe = StableDiffusionXLPipeline.from_pretrained(saved, dtype=torch.float32, add_watermarker=False)
    assert torch.equal(pipe.unet.conv_in.weight, model.unet.conv_in.weight)


@dataclass
class ParameterPlan:
    """Which parameters a method trains, for memory estimates (no tensor values needed)."""

    trained: int  # parameters updated by the optimizer: fp32 weights, fp32 gradients
    frozen: int  # every other parameter of the UNet and text encoders, in the weight dtype
    optimizer: str  # "adamw8bit" | "adamw"
    optimizer_state_bytes: int  # Adam's two moments for the trained parameters


def parameter_plan(model, cfg, token: str = "sks", class_noun: str = "person") -> ParameterPlan:
    """Build cfg.method on `model` (a meta-device model works) and count what trains.

    For the memory planner: weights = trained * 4 + frozen * bytes(weight dtype), gradients =
    trained * 4, optimizer state = optimizer_state_bytes; activations come from running
    step.training_step on fake tensors.
    """
    method = build_method(model, cfg, token, class_noun)
    trained = method.parameters()
    ids = {id(p) for p in trained}
    modules = [model.unet, *text_encoders(model.text).values()]
    frozen = sum(p.numel() for m in modules for p in m.parameters() if id(p) not in ids)
    return ParameterPlan(sum(p.numel() for p in trained), frozen, cfg.optimizer,
                         optimizer_state_bytes(trained, cfg.optimizer))


def test_parameter_plan_for_the_memory_planner():
    config = json.loads((ROOT / "configs/sdxl-base-1.0/unet/config.json").read_text())
    from minidream.formats.checkpoint import build_unet

    with torch.device("meta"):  # the real SDXL UNet, shapes only
        unet = build_unet(config)
    model = SimpleNamespace(unet=unet, text=NO_TEXT)
    plan = parameter_plan(model, TrainConfig(method="full", optimizer="adamw8bit", gradient_checkpointing=True))
    assert plan.trained == 2_567_463_684 and plan.frozen == 0 and plan.optimizer == "adamw8bit"
    assert 2 * plan.trained < plan.optimizer_state_bytes < 2.1 * plan.trained  # 8-bit moments (+ block scales)
    # the formula matches what bitsandbytes allocates (one small fp32 tensor, one quantised)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1000, 10_000)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer, name = make_optimizer([{"params": params}], "adamw8bit", lr=1e-3)
    optimizer.step()
    held = sum(v.numel() * v.element_size() for p in params for k, v in optimizer.state[p].items()
               if torch.is_tensor(v) and not k.startswith("qmap") and v.numel() > 1)  # qmaps: shared tables
    assert name == "adamw8bit" and held == optimizer_state_bytes(params, "adamw8bit")
    assert optimizer_state_bytes(params, "adamw") == 8 * 11_000
