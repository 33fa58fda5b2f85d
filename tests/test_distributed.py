"""Training on several processes (minidream.parallel.distributed): 2 CPU processes over gloo, as torchrun
starts them, against one process with the same global batch.

Each rank draws the same global batch and keeps its rows, and DDP averages the two gradients, so
two processes must compute the gradient of one process with twice the batch size. Not bit for
bit: one process sums over all rows in one backward, two processes each over half, then average;
float32 sums in another order differ in the last bits (~1e-7 of a tensor's largest gradient).
Checked at three levels:

- gradients of one step (LoRA, full, textual inversion), DDP vs one process: <= 1e-5 of the
  largest gradient;
- whole runs through train(): losses and gradient norms of every step <= 1e-5 relative;
- the trained weights: 99% of them within 1e-5 of their tensor's scale. Not all: Adam divides each
  gradient element by its own magnitude (lr * g / (|g| + 1e-8) at the first step), so an element
  whose gradient is at rounding level (|g| ~ 1e-8, measured here: -1.4e-8 vs +2.9e-8; e.g. conv
  biases just before a one-channel-per-group GroupNorm, whose true gradient is 0) moves by up to
  lr either way. The bound for those is Adam's own: lr * steps.

torch AdamW is used: AdamW8bit's block-wise quantisation would add its own rounding steps.
"""

import csv
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from minidream.parallel import distributed
from minidream.parallel.distributed import Dist
from minidream.methods.registry import build_method
from minidream.formats.models import BUNDLED_MODEL, load_model
from minidream.runs import StopRequest
from minidream.schedule import alphas_cumprod
from minidream.step import Batch, training_step
from minidream.text import encode_text
from minidream.config import TrainConfig
from _train import train_like_cli as train

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def test_shard_keeps_each_ranks_instance_and_class_rows():
    n = 6  # 3 ranks x 1 instance row + 3 class rows
    batch = Batch(latents=torch.arange(n).float()[:, None], noise=torch.zeros(n, 1), timesteps=torch.arange(n) * 10,
                  time_ids=None, prompt_index=torch.tensor([0, 0, 0, 1, 1, 1]), num_instance=3)
    shards = [Dist(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert [s.latents.flatten().tolist() for s in shards] == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    assert all(s.num_instance == 1 and s.prompt_index.tolist() == [0, 1] and s.time_ids is None for s in shards)
    assert Dist().shard(batch) is batch  # one process: the whole batch


def test_one_key_press_reaching_a_process_twice_is_one_stop_request():
    """Under torchrun Ctrl-C reaches each rank from the terminal and again from torchrun."""
    with StopRequest(grace=60.0) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the forwarded copy: no KeyboardInterrupt
        assert stop.requested
    with pytest.raises(KeyboardInterrupt), StopRequest(grace=0.0) as stop:
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)
        signal.raise_signal(signal.SIGINT)  # a real second Ctrl-C: abort at once


def write_subject(root: Path) -> Path:
    subject = root / "raj"
    subject.mkdir(parents=True)
    (subject / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    for i, size in enumerate([(72, 66), (96, 70), (66, 80), (70, 70)]):
        img = Image.new("RGB", size, (40 * i, 120, 200 - 50 * i))
        img.paste((250, 20, 180), (8, 8, 24, 24))
        img.save(subject / f"{i}.png")
    return subject


def settings(root: Path, name: str, **overrides) -> dict:
    return dict(subject=str(root / "raj"), model=str(ROOT / BUNDLED_MODEL), out=str(root / name), steps=3,
                class_dir=str(root / f"class-{name}"), num_class_images=3, class_steps=2, validate_every=0,
                save_every=1, keep_checkpoints=0, log_every=1, views_per_image=1, optimizer="adamw", device="cpu",
                cpu_threads=1, lr=1e-3, class_batch=1) | overrides  # batch 1: class images equal bit for bit


RUNS = {  # name: settings; "grad_accum" exercises DDP's no_sync on the first micro-batch
    "lora": dict(method="lora", grad_accum=2, snr_gamma=5.0),
    "full": dict(method="full", steps=2, lr=1e-4),
}


def gradient_errors(dist: Dist) -> dict[str, float]:
    """{method: max |DDP gradient - one-process gradient| / max |one-process gradient|, over all trained values}.

    One scale for all tensors: in the tiny UNet's first level GroupNorm has one channel per group, so
    it removes any per-channel constant and the gradient of a conv bias before it is exactly 0 in
    theory, rounding noise in practice; relative to itself that noise differs by 100%."""
    errors = {}
    for method_name in ("lora", "full", "textual-inversion"):
        model = load_model(ROOT / BUNDLED_MODEL)
        cfg = TrainConfig(method=method_name, lr=1e-3, gradient_checkpointing=False, lora_targets="attn")
        torch.manual_seed(0)
        method = build_method(model, cfg, "rraj", "person")
        with torch.no_grad():  # LoRA's B starts at 0, which would leave A without gradient
            for name, p in model.unet.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        prompts = [method.prompt("a photo of rraj person"), "a photo of person"]
        trains_text = method.trains_text(cfg)
        table = None if trains_text else [t.detach() for t in encode_text(model.text, prompts)]
        embed = (lambda: encode_text(model.text, prompts)) if trains_text else (lambda: table)
        g = torch.Generator().manual_seed(1)
        batch = Batch(latents=torch.randn(4, 4, 8, 8, generator=g), noise=torch.randn(4, 4, 8, 8, generator=g),
                      timesteps=torch.tensor([37, 612, 905, 250]), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 4),
                      prompt_index=torch.tensor([0, 0, 1, 1]), num_instance=2)
        alphas = alphas_cumprod(model.schedule)
        params = method.parameters()
        training_step(model.unet, batch, embed, alphas)  # one process, the whole batch
        single = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        text_modules = {k: m for k, m in method.trained_modules().items() if k != "unet"}
        ddp = dist.wrap(model.unet, text_modules, find_unused=cfg.train_text_encoder)
        training_step(ddp, dist.shard(batch), embed, alphas)  # this rank's half; DDP averages
        scale = max(s.abs().max() for s in single)  # not per tensor: some tensors' true gradient is 0 (below)
        errors[method_name] = (max((p.grad - s).abs().max() for p, s in zip(params, single)) / scale).item()
    return errors


def worker(rank: int, root: str, port: int) -> None:
    """One of two ranks, as torchrun would start it: gradients of one step, the LoRA and full runs,
    then the LoRA run resumed from its step-1 checkpoint."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(root)
    dist = distributed.setup("cpu")
    (root / f"gradients-rank{rank}.json").write_text(json.dumps(gradient_errors(dist)))
    for name, kw in RUNS.items():
        train(TrainConfig(**settings(root, f"ddp-{name}", batch_size=1, **kw)), dist)
    # the LoRA run as if stopped after step 1 (its later checkpoints and result gone), resumed on 2 ranks
    resumed = root / "ddp-resumed" / only_run(root / "ddp-lora").name
    if dist.is_main:
        shutil.copytree(only_run(root / "ddp-lora"), resumed)
        for late in ("step-000002.pt", "step-000003.pt", "step-000003.safetensors"):
            (resumed / "checkpoints" / late).unlink()
        (resumed / "pytorch_lora_weights.safetensors").unlink()
    dist.barrier()
    train(TrainConfig(resume=str(resumed)), dist)
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> list[list[float]]:
    with open(run / "loss.csv") as f:
        return [[float(r[k]) for k in ("loss", "instance_loss", "prior_loss", "grad_norm")] for r in csv.DictReader(f)]


def only_run(folder: Path) -> Path:
    (run,) = [p for p in folder.iterdir() if p.name.startswith("raj-") and not p.is_symlink()]  # not raj-latest
    return run


def weight_differences(a: dict, b: dict) -> tuple[float, float]:
    """(fraction of values differing by more than 1e-5 of their tensor's scale, largest difference)."""
    assert set(a) == set(b) and a
    off = sum(((a[k] - b[k]).abs() > 1e-5 * b[k].abs().max()).sum().item() for k in a)
    return off / sum(v.numel() for v in a.values()), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_subject(root)
    mp.spawn(worker, args=(str(root), free_port()), nprocs=2, join=True)
    for name, kw in RUNS.items():  # one process, twice the batch: the same global batch
        train(TrainConfig(**settings(root, f"single-{name}", batch_size=2, **kw)))
    return root


def test_ddp_gradients_equal_one_process_gradients(runs):
    for rank in (0, 1):
        errors = json.loads((runs / f"gradients-rank{rank}.json").read_text())
        print(f"rank {rank}: gradient rel error, DDP vs one process: {errors}")
        assert set(errors) == {"lora", "full", "textual-inversion"}
        assert all(e <= TOL for e in errors.values())


def test_two_processes_train_as_one_with_the_same_global_batch(runs):
    for name, kw in RUNS.items():
        ddp, single = only_run(runs / f"ddp-{name}"), only_run(runs / f"single-{name}")
        a, b = torch.tensor(losses(ddp)), torch.tensor(losses(single))
        steps = kw.get("steps", 3)
        assert a.shape == b.shape == (steps, 4)
        loss_err = ((a - b).abs() / b.abs()).max().item()
        final = {"lora": lambda run: load_file(run / "pytorch_lora_weights.safetensors"),
                 "full": lambda run: load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")}[name]
        off, largest = weight_differences(final(ddp), final(single))
        lr = kw.get("lr", 1e-3)
        print(f"{name}: 2 processes vs 1: losses and grad norms rel {loss_err:.1e}; trained values off by more than "
              f"1e-5: {off:.2%}, largest difference {largest:.1e} (lr x steps = {lr * steps:.0e})")
        assert loss_err <= TOL
        assert off <= 0.01 and largest <= lr * steps
        assert (a[:, 2] > 0).all()  # the prior term was there (class images from both ranks)


def test_class_images_are_split_across_ranks_and_equal_one_process_images(runs):
    ddp, single = runs / "class-ddp-lora", runs / "class-single-lora"
    names = sorted(p.name for p in ddp.iterdir())
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png"] == sorted(p.name for p in single.iterdir())
    for n in names:  # image N has seed + N whichever rank made it (one image per UNet call: in batches
        assert (ddp / n).read_bytes() == (single / n).read_bytes()  # only up to rounding, test_training_run)


def test_only_rank_zero_writes_and_resume_continues_exactly(runs):
    for name in RUNS:  # one run folder per run, made by rank 0 (rank 1 learned its name), and raj-latest
        made = sorted((runs / f"ddp-{name}").iterdir())
        assert len(made) == 2 and made[1].name == "raj-latest" and made[1].resolve() == made[0].resolve()
    resumed, uninterrupted = only_run(runs / "ddp-resumed"), only_run(runs / "ddp-lora")
    assert losses(resumed) == losses(uninterrupted)
    a, b = load_file(resumed / "pytorch_lora_weights.safetensors"), load_file(uninterrupted / "pytorch_lora_weights.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
