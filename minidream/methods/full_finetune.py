"""Full fine-tuning: DreamBooth as the paper did it, every UNet weight trained (Ruiz et al. 2022).

Same data, same prior-preservation loss (step.py, eq. 2), same loop as LoRA (training.py); what
changes is what trains and how big everything gets:

    method (SDXL unless said)  trained values     result                         fp32 weights + grads + 8-bit Adam
    LoRA rank 4                5.8 M              a 23 MB file                   0.05 GiB: fits a 16 GB T4
    full SD 1.5 / SD 2.1       0.86 B / 0.87 B    a model folder, 1.7 GB new     8.0 GiB: fits a T4 with this recipe
    full SDXL                  2.57 B             a model folder, 5.1 GB new     24 GiB: does not fit 16 GB

The T4 recipe (the DreamBooth notebooks' SD 2 recipe) is the same as for LoRA:

- mixed precision with fp32 master weights (Micikevicius et al. 2018, sec. 3.1): the trained UNet
  is converted to fp32, so the optimizer adds its tiny updates (lr ~ 2e-6 times a normalised
  gradient) to fp32 numbers, where fp16 would round most of them away; the frozen parts (VAE,
  text encoders) stay in the fp16 they were loaded in; torch.autocast runs the UNet's matmuls and
  convolutions in fp16, and the GradScaler (optim.py) keeps the fp16 gradients from underflowing.
  The gradients land in the fp32 weights' .grad, so they are fp32 too;
- gradient checkpointing (unet.enable_gradient_checkpointing): activations recomputed in backward;
- 8-bit AdamW (bitsandbytes): Adam's two moments in 2 bytes per weight instead of 8.

--train-text-encoder trains both text encoders fully as well (fp32 masters, their own lr).

The result is a complete diffusers folder, `model/` in the run folder (model_folder.py): the
trained parts written in the run's weight dtype, the rest linked from the base model. Checkpoints
hold the fp32 master weights and the optimizer state, so resuming continues exactly; no model
folder is written beside each checkpoint (a few GB each).
"""

from __future__ import annotations

from minidream.method import Method, text_encoders, train_mode
from minidream.formats.model_folder import save_model_folder


class FullFinetune(Method):
    """train.py --method full: the whole UNet (and with --train-text-encoder both text encoders)."""

    name = "full"
    output = "model"
    sample_flag = "--model"
    checkpoint_result = False

    def __init__(self, model, cfg, token, class_noun):
        super().__init__(model, cfg, token, class_noun)
        self.save_dtype = next(model.unet.parameters()).dtype  # the run's weight dtype, before the fp32 copy
        self.modules = {"unet": model.unet} | (text_encoders(model.text) if cfg.train_text_encoder else {})
        for module in self.modules.values():
            module.float().requires_grad_(True)  # fp32 master weights (see the module docstring)
            train_mode(module, cfg.gradient_checkpointing)

    def trained_modules(self):
        return self.modules

    def param_groups(self):
        return [{"params": list(m.parameters()), "lr": self.cfg.lr if name == "unet" else self.cfg.text_encoder_lr}
                for name, m in self.modules.items()]

    def state_dict(self):
        return {name: m.state_dict() for name, m in self.modules.items()}

    def save(self, path, step):
        return save_model_folder(path, self.model, self.modules, self.save_dtype, tokenizer_dir=self.cfg.tokenizer)

    def summary(self) -> str:
        parts = " + ".join(self.modules)
        return f"{sum(p.numel() for p in self.parameters()):,} parameters ({parts}, fp32 master weights)"
