"""What a run trains. The loop (training.py) is the same for every method; a method says which
parameters train (setting the model up for them), what a checkpoint keeps of them, how the result
is written and how prompts name the subject. LoRA (Hu et al. 2021) is here; full fine-tuning and
textual inversion are in minidream/methods/. Building a method reads no tensor value, so the
memory planner builds it on a meta-device model."""

import contextlib
from pathlib import Path

import torch
from torch import nn

from minidream.lora import (TEXT_ATTENTION, inject_lora, lora_layer, lora_parameters,
                            lora_state_dict, mark_only_lora_trainable, unet_targets)
from minidream.lora_file import save_lora
from minidream.config import LORA_FILE, TrainingError
from minidream.optim import make_optimizer


class Method:
    """Base class: a training method on a loaded model (see the module docstring)."""

    name = ""
    output = ""  # the result's name in the run folder
    sample_flag = ""  # how sample.py uses the result
    checkpoint_result = True  # also write the result beside each checkpoint (if it is small)

    def __init__(self, model, cfg, token: str, class_noun: str):
        self.model, self.cfg, self.token, self.class_noun = model, cfg, token, class_noun

    # Do gradients reach the text encoders? Then prompts are encoded every step, not cached.
    @staticmethod
    def trains_text(cfg) -> bool: return bool(cfg.train_text_encoder)

    # {name: module} of the modules holding trained parameters (DDP wraps them)
    def trained_modules(self) -> dict[str, nn.Module]: raise NotImplementedError
    def param_groups(self) -> list[dict]: raise NotImplementedError  # optimizer groups
    # {module name: {tensor name: tensor}}: what a checkpoint must store to resume
    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]: raise NotImplementedError
    def save(self, path, step: int) -> Path: raise NotImplementedError  # write the result

    def make_optimizer(self):  # (optimizer, name): EMA and pivotal tuning add hooks to it
        cfg = self.cfg
        return make_optimizer(self.param_groups(), cfg.optimizer, lr=cfg.lr,
                              weight_decay=cfg.weight_decay)

    # the weights validation images are drawn from (EMA swaps its average in for the duration)
    def result_weights(self): return contextlib.nullcontext()

    def parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"]]

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Put a checkpoint's trained tensors back; the key sets must be exactly this run's."""
        mine = self.state_dict()
        for name, tensors in mine.items():
            if set(state) != set(mine) or set(state[name]) != set(tensors):
                raise TrainingError(f"{where} holds other {self.name} tensors for {name} than this "
                                    "run builds (was config.json edited?); start a new run instead")
        for name, module in self.trained_modules().items():
            module.load_state_dict(state[name], strict=False)

    # `text` as this method's result is prompted (textual inversion names the subject differently)
    def prompt(self, text: str) -> str: return text

    @staticmethod
    def check_subject(cfg, subject) -> None: pass  # raise TrainingError where it cannot learn

    def summary(self) -> str:
        return f"{sum(p.numel() for p in self.parameters()):,} {self.name} parameters"


def text_encoders(text) -> dict[str, nn.Module]:  # {"text_encoder": ..., "text_encoder_2": ...}
    both = {"text_encoder": text.text_encoder, "text_encoder_2": text.text_encoder_2}
    return {k: m for k, m in both.items() if m is not None}  # SD 1.x / 2.x: the first only


def train_mode(module: nn.Module, gradient_checkpointing: bool) -> None:
    """train() mode, and activation checkpointing for minidream's UNet or a transformers CLIP."""
    module.train()  # CLIP's dropout is 0; transformers only checkpoints in train mode
    no_reentrant = {"use_reentrant": False}
    if hasattr(module, "enable_gradient_checkpointing"):  # minidream.unet.UNet
        module.enable_gradient_checkpointing(gradient_checkpointing)
    elif gradient_checkpointing and hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(no_reentrant)  # transformers 5's name
    elif gradient_checkpointing:  # transformers 4.x has only the old name
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)


# ----------------------------------------------------------------------------- LoRA

class LoRA(Method):
    """Fresh fp32 adapters on the frozen UNet's attention (other layers with --lora-targets) and,
    with --train-text-encoder, on both text encoders' attention; only they train. The result: one
    diffusers-layout LoRA file (SDXL, rank 4 on attention: 5.8 M values, 23 MB in fp32)."""

    name = "lora"
    output = LORA_FILE
    sample_flag = "--lora"
    make_layer = staticmethod(lora_layer)  # DoRA's (methods/dora.py) makes its own layers
    adapter_parameters = staticmethod(lora_parameters)  # what trains (DoRA's: A, B and m)

    def __init__(self, model, cfg, token, class_noun):
        super().__init__(model, cfg, token, class_noun)
        text = text_encoders(model.text) if cfg.train_text_encoder else {}
        self.modules = {"unet": model.unet} | text
        for name, module in self.modules.items():
            targets = unet_targets(cfg.lora_targets) if name == "unet" else TEXT_ATTENTION
            inject_lora(module, targets, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                        make_layer=self.make_layer)
            mark_only_lora_trainable(module, self.adapter_parameters)
            train_mode(module, cfg.gradient_checkpointing)

    def trained_modules(self): return self.modules

    def param_groups(self):
        cfg = self.cfg
        return [{"params": self.adapter_parameters(m),
                 "lr": cfg.lr if n == "unet" else cfg.text_encoder_lr}
                for n, m in self.modules.items()]

    def state_dict(self): return {name: lora_state_dict(m) for name, m in self.modules.items()}

    def save(self, path, step):
        return save_lora(path, **self.modules, token=self.token, class_noun=self.class_noun,
                         steps=step, base_model=self.model.name)
