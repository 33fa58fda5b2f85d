"""train.py --ema-decay D: the result is an exponential moving average of the trained parameters
instead of their last values (Polyak averaging; Polyak & Juditsky 1992 average the iterates, this
is the exponentially weighted form diffusion training uses, e.g. Song & Ermon 2020, "Improved
Techniques for Training Score-Based Generative Models", technique 5):

    ema <- D * ema + (1 - D) * p        after every optimizer step that was applied

The average starts at the initial parameters (LoRA: B = 0, the base model) and forgets them with
a time constant of about 1 / (1 - D) steps (D = 0.99: 100), so D suits runs several times longer
than that. It is kept in fp32 beside the parameters (one more copy of what trains: 23 MB for
SDXL LoRA rank 4, 10 GB for full SDXL fine-tuning). An fp16 step skipped for inf/NaN gradients
never calls optimizer.step(), so its hook does not run and the average does not move either.

The raw parameters go on training; the average is what validation draws and what the result
file (and the one beside each checkpoint) holds: result_weights() copies it into the parameters
for the duration and the raw values back after. A checkpoint keeps the average (under "ema", by
position in method.parameters()), so a resumed run continues it exactly.

EMA works with any Method: with_ema(LoRA) is a subclass of LoRA (and of EMA) with these hooks.
"""

import contextlib

import torch

from minidream.method import Method


class EMA:
    """The EMA half of with_ema(cls): every other method comes from cls (see the module
    docstring); cfg.ema_decay is D."""

    def __init__(self, model, cfg, token, class_noun):
        super().__init__(model, cfg, token, class_noun)
        self.decay = cfg.ema_decay
        self.averages = [p.detach().to(torch.float32, copy=True) for p in self.parameters()]

    def make_optimizer(self):
        optimizer, name = super().make_optimizer()
        optimizer.register_step_post_hook(lambda *_: self.update())  # after each applied step
        return optimizer, name

    @torch.no_grad()
    def update(self) -> None:
        """ema <- D ema + (1 - D) p, for every trained parameter."""
        for average, p in zip(self.averages, self.parameters()):
            average.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def state_dict(self):
        return super().state_dict() | {"ema": {str(i): a for i, a in enumerate(self.averages)}}

    def load_state_dict(self, state, where="the checkpoint"):
        super().load_state_dict(state, where)  # checks the key sets, "ema"'s included
        with torch.no_grad():
            for i, average in enumerate(self.averages):
                average.copy_(state["ema"][str(i)])

    @contextlib.contextmanager
    def result_weights(self):
        """The average in the parameters for the duration; the raw values, bit for bit, after."""
        params = self.parameters()
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, average in zip(params, self.averages):
                p.copy_(average)
        try:
            with super().result_weights():
                yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, raw):
                    p.copy_(value)

    def save(self, path, step):
        with self.result_weights():
            return super().save(path, step)

    def summary(self) -> str:
        return f"{super().summary()} + their EMA (decay {self.decay:g})"


def with_ema(cls: type[Method]) -> type[Method]:
    """cls whose result is the EMA of its trained parameters: class <cls>WithEMA(EMA, cls)."""
    return type(cls.__name__ + "WithEMA", (EMA, cls), {})
