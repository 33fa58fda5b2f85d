"""train.py --ema-decay D (minidream/methods/ema.py): the update rule on a toy parameter, then runs
on a tiny random SDXL-shaped model (CPU, seconds): the result file is the average, validation
draws from it and training goes on from the raw weights, resume continues the average exactly.
The fixture and helpers here also drive test_dora.py's training runs."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import minidream.training as training
from _train import interrupted_then_resumed, train_like_cli
from minidream.config import LORA_FILE, TrainConfig
from minidream.method import LoRA, Method
from minidream.methods.registry import method_class
from minidream.methods.dora_method import DoRA
from minidream.methods.ema import EMA, with_ema
from minidream.optim import make_grad_scaler, resolve_precision
from minidream.step import apply_gradients
from minidream.toy.tiny import write_tiny_sdxl
from tests.test_distributed import write_subject


# ----------------------------------------------------------------------------- the rule on a toy

class Toy(Method):
    """One trained vector and nothing else: the smallest Method."""

    name = "toy"

    def __init__(self, model, cfg, token, class_noun):
        super().__init__(model, cfg, token, class_noun)
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def param_groups(self):
        return [{"params": [self.weight], "lr": self.cfg.lr}]

    def trained_modules(self):
        return {}

    def state_dict(self):
        return {}


def toy(decay=0.9):
    cfg = SimpleNamespace(ema_decay=decay, optimizer="adamw", lr=0.1, weight_decay=0.0)
    method = with_ema(Toy)(None, cfg, "rraj", "person")
    return method, *method.make_optimizer()


def test_the_average_follows_the_rule_after_each_applied_step():
    """ema <- D ema + (1 - D) p after every step the optimizer applies, from the initial value; a
    step skipped for inf/NaN gradients moves neither the parameter nor the average."""
    method, optimizer, _ = toy(decay=0.9)
    scaler = make_grad_scaler(resolve_precision("fp32", torch.device("cpu")))
    want = method.weight.detach().double().clone()  # the average starts at the initial value
    assert type(method).__name__ == "ToyWithEMA" and isinstance(method, EMA)
    for step in range(5):
        before = method.weight.detach().clone()
        loss = ((method.weight - torch.tensor([3.0, 1.0, -1.0])) ** 2).sum()
        loss.backward()
        if step == 2:  # as an fp16 overflow would leave it
            method.weight.grad[0] = float("inf")
        _, applied = apply_gradients(optimizer, method.parameters(), scaler, 1.0)
        assert applied == (step != 2)
        if applied:
            want = 0.9 * want + 0.1 * method.weight.detach().double()
        else:
            assert torch.equal(method.weight.detach(), before)
        (average,) = method.averages
        assert average.dtype == torch.float32
        torch.testing.assert_close(average.double(), want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(method.weight.detach(), average)  # the average lags behind


def test_result_weights_swap_the_average_in_and_the_raw_values_back():
    method, optimizer, _ = toy()
    for _ in range(3):
        (method.weight ** 3).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    raw = method.weight.detach().clone()
    with method.result_weights():
        assert torch.equal(method.weight.detach(), method.averages[0])
    assert torch.equal(method.weight.detach(), raw)  # bit for bit
    with pytest.raises(RuntimeError), method.result_weights():  # restored on errors too
        raise RuntimeError("a failed validation")
    assert torch.equal(method.weight.detach(), raw)
    state = method.state_dict()
    assert list(state) == ["ema"] and torch.equal(state["ema"]["0"], method.averages[0])
    other, _, _ = toy()
    other.load_state_dict(state)
    assert torch.equal(other.averages[0], method.averages[0])


def test_the_decay_chooses_the_class():
    """--ema-decay 0 (the default) is plain LoRA; D > 0 wraps whichever class trains."""
    cfg = TrainConfig()
    assert method_class(cfg) is LoRA
    cfg.ema_decay = 0.99
    assert issubclass(method_class(cfg), LoRA) and issubclass(method_class(cfg), EMA)
    cfg.dora = True
    assert issubclass(method_class(cfg), DoRA) and issubclass(method_class(cfg), EMA)
    assert method_class(cfg).name == "lora"  # the loop checks cfg.method against it


# -------------------------------------------------------------- runs (test_dora.py uses these too)

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and a subject folder of four photos."""
    root = tmp_path_factory.mktemp("world")
    model = write_tiny_sdxl(root / "tiny-sdxl")
    return {"model": str(model), "subject": str(write_subject(root))}


def config(world, out, **overrides) -> TrainConfig:
    settings = dict(subject=world["subject"], model=world["model"], out=str(out), prior=False,
                    steps=6, validate_every=0, save_every=2, keep_checkpoints=0, log_every=1,
                    validation_steps=2, views_per_image=1)
    return TrainConfig(**(settings | overrides))


def losses(run: Path) -> list[tuple[str, ...]]:
    with open(run / "loss.csv") as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in csv.DictReader(f)]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def capture_methods(monkeypatch, cls=EMA) -> list:
    """The methods (of class cls) the runs build from now on: cls.__init__ records each."""
    built, real_init = [], cls.__init__

    def init_and_record(self, *args):
        real_init(self, *args)
        built.append(self)

    monkeypatch.setattr(cls, "__init__", init_and_record)
    return built


def test_the_result_is_the_average_and_the_checkpoint_keeps_both(world, tmp_path, monkeypatch):
    built = capture_methods(monkeypatch)
    run = train_like_cli(config(world, tmp_path / "ema", steps=4, ema_decay=0.9))
    plain = train_like_cli(config(world, tmp_path / "plain", steps=4))
    (method,) = built
    names = {id(p): n for n, p in method.modules["unet"].named_parameters()}
    averages = {f"unet.{names[id(p)]}": a for p, a in zip(method.parameters(), method.averages)}
    written = load_file(run / LORA_FILE)
    assert same_tensors(written, averages)  # the file: the average, exactly
    assert same_tensors(load_file(run / "checkpoints" / "step-000004.safetensors"), written)
    raw = {f"unet.{k}": v for k, v in torch.load(run / "checkpoints" / "step-000004.pt")
           ["trained"]["unet"].items()}
    assert same_tensors(raw, load_file(plain / LORA_FILE))  # EMA does not change training
    assert not any(torch.equal(raw[k], written[k]) for k in written if ".lora_B." in k)
    assert losses(run) == losses(plain)


def test_validation_draws_the_average_and_training_goes_on_from_the_raw_weights(world, tmp_path,
                                                                                 monkeypatch):
    drawn, real_generate = [], training.generate
    built = capture_methods(monkeypatch)

    def generate_and_check(model, *args, **kw):
        (method,) = built
        drawn.append(all(torch.equal(p, a) for p, a in zip(method.parameters(), method.averages)))
        return real_generate(model, *args, **kw)

    monkeypatch.setattr(training, "generate", generate_and_check)
    validated = train_like_cli(config(world, tmp_path / "v", steps=3, validate_every=1,
                                      ema_decay=0.9, validation_seeds=[0],
                                      validation_prompts=["a photo of rraj person"]))
    assert drawn == [True] * 4  # before step 1 and after steps 1, 2, 3
    (method,) = built
    assert any(not torch.equal(p, a) for p, a in zip(method.parameters(), method.averages))
    monkeypatch.setattr(training, "generate", real_generate)
    unvalidated = train_like_cli(config(world, tmp_path / "u", steps=3, ema_decay=0.9))
    assert losses(validated) == losses(unvalidated)  # the raw weights came back bit for bit
    assert same_tensors(load_file(validated / LORA_FILE), load_file(unvalidated / LORA_FILE))


def test_resume_continues_the_average_exactly(world, tmp_path, monkeypatch):
    uninterrupted = train_like_cli(config(world, tmp_path / "a", ema_decay=0.8))
    resumed = interrupted_then_resumed(config(world, tmp_path / "b", ema_decay=0.8), monkeypatch)
    assert losses(resumed) == losses(uninterrupted)
    assert same_tensors(load_file(resumed / LORA_FILE), load_file(uninterrupted / LORA_FILE))


def test_ema_with_dora_averages_the_magnitudes_too(world, tmp_path):
    run = train_like_cli(config(world, tmp_path, steps=3, dora=True, ema_decay=0.5))
    written = load_file(run / LORA_FILE)
    magnitudes = [k for k in written if k.endswith(".lora_magnitude_vector")]
    state = torch.load(run / "checkpoints" / "step-000003.pt")["trained"]
    assert magnitudes and len(state["ema"]) == len(written)  # A, B and m each averaged
    raw = {f"unet.{k}": v for k, v in state["unet"].items()}
    assert all(not torch.equal(written[k], raw[k]) for k in magnitudes)
