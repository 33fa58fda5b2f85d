"""Pivotal tuning: a new word and LoRA on the UNet, trained together (train.py --method pivotal).

The name comes from GAN inversion (Roich et al. 2022, "Pivotal Tuning for Latent-based Editing of
Real Images"): a photo is first inverted to a StyleGAN latent code, the pivot, and the generator is
then fine-tuned around that fixed code until it draws the photo. In DreamBooth the pivot is a word:
the subject gets a new token, `<rraj>`, whose embedding is learned as in textual inversion
(textual_inversion.py: one row per text encoder, initialised from the class noun), while LoRA
adapters on the UNet (method.py) learn what no word of the frozen model can reach. cloneofsimo/lora
(`lora_pti`) runs the two as phases, the inversion first; diffusers' advanced SDXL DreamBooth script
(`--train_text_encoder_ti`) trains both from the first step and stops the word after a share of the
epochs (`--train_text_encoder_ti_frac`, default 0.5) by setting its learning rate to 0. minidream
does the latter, counted in optimizer steps. What trains (DreamBooth's loss, step.py):

    v*, A*, B* = argmin_{v,A,B} E ||eps - eps_{W + (alpha/r) B A}(z_t, t, c(y with v))||^2
                              + lambda E ||eps' - eps_{W + (alpha/r) B A}(z'_t, t', c(y_class))||^2

v: the word's vectors, (n, 768) for CLIP-L and (n, 1280) for OpenCLIP bigG on SDXL, at
--embedding-lr; A, B: each adapted UNet layer's LoRA factors, at --lr. The class prompt lacks the
word, so the prior term trains the adapters only. The prompts are encoded every step (the gradient
must reach v); the text encoders' own weights stay frozen.

The freeze (--embedding-steps N > 0): a hook that runs before every optimizer step (after the
loop's set_lr has written the scheduled rates) sets the word's rate to 0 once N updates have been
applied to it. AdamW with rate 0 moves nothing (its decoupled weight decay is scaled by the rate
too), so the vectors stay bit-identical while the adapters go on training. The count is the
optimizer's own "step" of the word's vectors: checkpoints keep it, so a resumed run freezes at the
same step. An fp16 step skipped for inf/NaN gradients calls no optimizer step and does not count.
The word's gradient is still computed after the freeze, and still counts in --max-grad-norm's norm.

Files: at path P the LoRA file, as LoRA writes it, and the word beside it (textual inversion's
layout, SDXL {"clip_l", "clip_g"}): for the run's result, P = RUN/pytorch_lora_weights.safetensors,
it is RUN/learned_embeds.safetensors (the names diffusers' scripts write); for any other P, P's
stem + "-embeddings.safetensors" (checkpoints/step-000500.safetensors ->
checkpoints/step-000500-embeddings.safetensors, deleted with its checkpoint). `sample.py --lora
RUN` loads both. In diffusers: pipe.load_lora_weights(RUN), then load_textual_inversion of
"clip_l" (with text_encoder, tokenizer) and of "clip_g" (with text_encoder_2, tokenizer_2).
"""

from __future__ import annotations

from pathlib import Path

from minidream.config import EMBEDDING_FILE, LORA_FILE
from minidream.lora_file import save_lora
from minidream.method import LoRA
from minidream.methods.textual_inversion import TextualInversion

CHECKPOINT_WORD = "-embeddings.safetensors"  # a checkpoint's word file: step-000500 + this


def embedding_path(lora_file) -> Path:
    """Where the word goes beside the LoRA file `lora_file` (the module docstring's rule)."""
    lora_file = Path(lora_file)
    if lora_file.name == LORA_FILE:
        return lora_file.with_name(EMBEDDING_FILE)
    return lora_file.with_name(lora_file.stem + CHECKPOINT_WORD)


class Pivotal(LoRA):
    """train.py --method pivotal: UNet LoRA (as LoRA) + a new word in each text encoder (as
    TextualInversion, which this method holds as self.word), each at its own learning rate."""

    name = "pivotal"

    def __init__(self, model, cfg, token, class_noun):
        super().__init__(model, cfg, token, class_noun)  # UNet adapters (no --train-text-encoder)
        self.word = TextualInversion(model, cfg, token, class_noun)  # <rraj> in each encoder

    @staticmethod
    def trains_text(cfg) -> bool:
        return True

    def trained_modules(self):
        return self.modules | self.word.trained_modules()

    def param_groups(self):  # the word's group last: the loop logs group 0's lr (the UNet's)
        word = {"params": self.word.parameters(), "lr": self.cfg.embedding_lr}
        return super().param_groups() + [word]

    def state_dict(self):
        return super().state_dict() | self.word.state_dict()

    def make_optimizer(self):
        optimizer, name = super().make_optimizer()
        vectors, stop = self.word.parameters()[0], self.cfg.embedding_steps

        def freeze_the_word(optimizer, args, kwargs):  # before each optimizer.step()
            applied = int(optimizer.state.get(vectors, {}).get("step", 0))  # updates so far
            if stop and applied >= stop:
                optimizer.param_groups[-1]["lr"] = 0.0  # load_state_dict replaces the group dicts

        optimizer.register_step_pre_hook(freeze_the_word)
        return optimizer, name

    def save(self, path, step):
        """The LoRA file at `path` and the word beside it. Returns what sample.py --lora takes: the
        run folder for the run's result (both files), the LoRA file for a checkpoint."""
        path = Path(path)
        save_lora(path, unet=self.modules["unet"], token=self.word.placeholder,
                  class_noun=self.class_noun, steps=step, base_model=self.model.name)
        self.word.save(embedding_path(path), step)
        return path.parent if path.name == LORA_FILE else path

    def prompt(self, text: str) -> str:
        return self.word.prompt(text)

    check_subject = staticmethod(TextualInversion.check_subject)  # the prompt must name the word

    def summary(self) -> str:
        adapters = sum(p.numel() for p in self.param_groups()[0]["params"])
        stop = self.cfg.embedding_steps
        frozen = f", frozen after step {stop}" if stop else ""
        return f"{adapters:,} lora parameters + {self.word.summary()}{frozen}"
