"""minidream.step / optim: one training step against diffusers + peft + torch AdamW, the DreamBooth
loss by hand, fp16 loss scaling with an injected inf gradient, overfitting, lr schedules."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from peft import LoraConfig

from minidream.lora import UNET_ATTENTION, inject_lora, lora_parameters, mark_only_lora_trainable
from minidream.optim import lr_at, make_optimizer
from minidream.schedule import ScheduleConfig, alphas_cumprod
from minidream.step import Batch, apply_gradients, dreambooth_loss, min_snr_weights, training_step
from minidream.unet import UNet, UNetConfig

SCHEDULE = ScheduleConfig()  # SDXL's: scaled_linear 0.00085..0.012, 1000 steps
# A shrunken SDXL UNet: a level without attention, then cross-attention with 2 transformer layers,
# linear proj_in/out, text_time added conditioning (pooled 32 + 6 time ids x 8 = 80). 8x8 latents.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=8,
)


def reference_unet(seed=0, config=TINY_SDXL_UNET) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def unet_under_test(reference) -> UNet:
    """minidream's UNet with the reference's weights (same state-dict keys)."""
    model = UNet(UNetConfig.from_dict(dict(reference.config)))
    model.load_state_dict(reference.state_dict())
    return model


def randomize_lora(model, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_batch(seed=0, n_instance=1, n_class=1):
    """A batch for lora_models.TINY_SDXL_UNET (8x8 latents, context 64, pooled 32)."""
    g = torch.Generator().manual_seed(seed)
    n = n_instance + n_class
    batch = Batch(latents=torch.randn(n, 4, 8, 8, generator=g), noise=torch.randn(n, 4, 8, 8, generator=g),
                  timesteps=torch.tensor([37, 612, 905, 250][:n]),
                  time_ids=torch.tensor([[48.0, 40, 0, 4, 32, 32], [32, 32, 0, 0, 32, 32]] * 2)[:n],
                  prompt_index=torch.tensor([0] * n_instance + [1] * n_class), num_instance=n_instance)
    prompts = (torch.randn(2, 5, 64, generator=g), torch.randn(2, 32, generator=g))  # (context, pooled) table
    return batch, prompts


def reference_step(ref, batch, prompts, prediction_type, snr_gamma, lr, weight_decay, max_norm,
                   trained=lambda name: "lora_" in name):
    """The step as diffusers' train_dreambooth_lora_sdxl.py computes it, with peft's LoRA and torch AdamW.
    trained(name) picks the parameters the optimizer updates (all of them for full fine-tuning)."""
    scheduler = DDPMScheduler.from_config(dict(SCHEDULE.__dict__, prediction_type=prediction_type))
    t, idx = batch.timesteps, batch.prompt_index
    noisy = scheduler.add_noise(batch.latents, batch.noise, t)
    target = batch.noise if prediction_type == "epsilon" else scheduler.get_velocity(batch.latents, batch.noise, t)
    added = {"text_embeds": prompts[1][idx], "time_ids": batch.time_ids}
    pred = ref(noisy, t, prompts[0][idx], added_cond_kwargs=added).sample
    pred, pred_prior = pred.chunk(2)
    target, target_prior = target.chunk(2)
    prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
    if snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float())
    else:  # min-SNR on the instance half, with the instance timesteps
        snr = compute_snr(scheduler, t.chunk(2)[0])
        weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
        weights = weights + 1 if prediction_type == "v_prediction" else weights
        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    loss = loss + 1.0 * prior_loss
    params = [p for n, p in ref.named_parameters() if trained(n)]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if trained(n)}
    optimizer.step()
    return loss.detach(), grads


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("epsilon", 5.0), ("v_prediction", 5.0)])
def test_one_step_equals_diffusers_peft_adamw(prediction_type, snr_gamma):
    lr, wd, max_norm = 1e-4, 1e-4, 0.05  # a small max norm, so that clipping is exercised
    ref = reference_unet()
    ours = unet_under_test(ref)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_ATTENTION)))
    inject_lora(ours, UNET_ATTENTION, rank=4)
    randomize_lora(ref)  # B = 0 would leave A without gradient: give both random values
    peft_name = lambda n: n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")  # noqa: E731
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(ref_params[peft_name(name)])
    mark_only_lora_trainable(ours)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    batch, prompts = make_batch()

    ref_loss, ref_grads = reference_step(ref, batch, prompts, prediction_type, snr_gamma, lr, wd, max_norm)

    params = lora_parameters(ours)
    optimizer, name = make_optimizer([{"params": params}], "adamw", lr=lr, weight_decay=wd)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = training_step(ours, batch, lambda: prompts, alphas_cumprod(SCHEDULE), prediction_type=prediction_type,
                           prior_weight=1.0, snr_gamma=snr_gamma, scaler=scaler)
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    norm, applied = apply_gradients(optimizer, params, scaler, max_grad_norm=max_norm)
    assert name == "adamw" and applied and norm > max_norm  # clipping was active

    loss_err = abs(losses.loss.item() - ref_loss.item()) / abs(ref_loss.item())
    ref_params = dict(ref.named_parameters())
    grad_err = max(rel_err(grads[n] * max_norm / (norm + 1e-6), ref_grads[peft_name(n)]) for n in grads)  # clipped
    weight_err = max(rel_err(p.detach(), ref_params[peft_name(n)].detach()) for n, p in ours.named_parameters()
                     if p.requires_grad)
    step_err = max(rel_err(p.detach() - before[n], ref_params[peft_name(n)].detach() - before[n])
                   for n, p in ours.named_parameters() if p.requires_grad)
    print(f"{prediction_type} gamma={snr_gamma}: loss rel {loss_err:.1e}, grad rel {grad_err:.1e}, "
          f"updated weights rel {weight_err:.1e}, weight change rel {step_err:.1e}")
    assert loss_err <= 1e-5 and weight_err <= 1e-5
    assert grad_err <= 1e-5
    # Adam's first step is lr * g / (|g| + 1e-8): where |g| is near 1e-8 the change amplifies rounding
    assert step_err <= 1e-3
    assert all((p.detach() != before[n]).any() for n, p in ours.named_parameters() if p.requires_grad)


def test_dreambooth_loss_by_hand():
    # rows: 1 instance, 2 class; each row (1, 1, 2)
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 1.0]]], [[[1.0, 1.0]]]])
    target = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]], [[[3.0, 1.0]]]])
    # instance: (1 + 4) / 2 = 2.5; class rows: (0 + 1) / 2 = 0.5 and (4 + 0) / 2 = 2, mean 1.25
    loss, instance, prior = dreambooth_loss(pred, target, num_instance=1, prior_weight=0.5)
    assert instance.item() == 2.5 and prior.item() == 1.25 and loss.item() == 2.5 + 0.5 * 1.25
    # per-row instance weights multiply the instance rows' MSE only
    loss, instance, prior = dreambooth_loss(pred, target, num_instance=1, prior_weight=0.5,
                                            instance_weights=torch.tensor([0.2]))
    assert instance.item() == pytest.approx(0.5) and prior.item() == 1.25
    # without class rows the prior term is 0
    loss, instance, prior = dreambooth_loss(pred[:1], target[:1], num_instance=1)
    assert (loss.item(), prior.item()) == (2.5, 0.0)


def test_min_snr_weights_by_hand():
    ac = alphas_cumprod(SCHEDULE)
    t = torch.tensor([0, 500, 999])
    snr = ac[t] / (1 - ac[t])
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(t, ac, 5.0), expected, rtol=1e-6)
    assert min_snr_weights(t, ac, 5.0)[0] < 0.01 and min_snr_weights(t, ac, 5.0)[2] == 1.0  # noisy t: weight 1
    assert torch.allclose(min_snr_weights(t, ac, 5.0, "v_prediction"), expected + 1, rtol=1e-6)


def small_lora_unet(seed=0):
    unet = unet_under_test(reference_unet(seed))
    torch.manual_seed(seed)
    inject_lora(unet, UNET_ATTENTION, rank=4)
    mark_only_lora_trainable(unet)
    return unet


def test_inf_gradient_skips_the_step_with_fp16_loss_scaling():
    """torch.amp.GradScaler("cpu") + fp16 autocast on CPU: the same path a T4 takes."""
    unet = small_lora_unet()
    params = lora_parameters(unet)
    optimizer, _ = make_optimizer([{"params": params}], "adamw", lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch, prompts = make_batch()
    ac = alphas_cumprod(SCHEDULE)
    kwargs = dict(autocast_dtype=torch.float16, scaler=scaler)

    training_step(unet, batch, lambda: prompts, ac, **kwargs)
    assert all(p.grad is not None for p in params)
    params[3].grad[0, 0] = float("inf")  # an fp16 overflow somewhere in backward
    before = [p.detach().clone() for p in params]
    norm, applied = apply_gradients(optimizer, params, scaler, max_grad_norm=1.0)
    assert not applied and not math.isfinite(norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing applied
    assert optimizer.state_dict()["state"] == {}  # Adam's moments untouched
    assert scaler.get_scale() == 2.0**9  # scale halved
    assert all(p.grad is None for p in params)

    losses = training_step(unet, batch, lambda: prompts, ac, **kwargs)
    norm, applied = apply_gradients(optimizer, params, scaler, max_grad_norm=1.0)
    assert applied and math.isfinite(norm) and math.isfinite(losses.loss.item())
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert scaler.get_scale() == 2.0**9


def test_overfitting_two_images_halves_the_loss():
    """Two images (random latents), fixed noise and timesteps: the attention LoRA alone must fit them.
    The tiny UNet has cross-attention at both levels, so the adapters see the full latent grid."""
    config = dict(TINY_SDXL_UNET, down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2, transformer_layers_per_block=(1, 1))
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_dict(config))
    inject_lora(unet, UNET_ATTENTION, rank=4)
    mark_only_lora_trainable(unet)
    params = lora_parameters(unet)
    optimizer, _ = make_optimizer([{"params": params}], "adamw", lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch, prompts = make_batch(seed=3, n_instance=2, n_class=0)
    ac = alphas_cumprod(SCHEDULE)
    losses = []
    for _ in range(40):
        losses.append(training_step(unet, batch, lambda: prompts, ac, scaler=scaler).loss.item())
        apply_gradients(optimizer, params, scaler, max_grad_norm=1.0)
    halved = [i for i, v in enumerate(losses) if v <= losses[0] / 2]
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f}; at most half from step {halved[:1]}")
    assert halved and all(v <= losses[0] / 2 for v in losses[halved[0]:])


def test_lr_schedules():
    assert lr_at(0, 1.0, "constant", warmup_steps=10, total_steps=100) == 1.0
    assert [lr_at(s, 1.0, "constant_with_warmup", 4, 100) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_at(2, 1.0, "cosine", 4, 104) == 0.75  # still warming up
    assert lr_at(4, 1.0, "cosine", 4, 104) == 1.0  # cosine starts at the peak
    assert lr_at(54, 1.0, "cosine", 4, 104) == pytest.approx(0.5)  # halfway down
    assert lr_at(104, 1.0, "cosine", 4, 104) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, 1.0, "linear")
