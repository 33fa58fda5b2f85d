"""train.py --method lora --dora: LoRA whose layers are DoRA layers (Liu et al. 2024, eq. 5), so
each adapted layer also trains m, the length of each output channel's weights. The layers are in
dora.py, the file in dora_file.py; this module joins them to the loop (it uses both, so it is
neither of them: dora_file.py reads dora.py's layers)."""

from minidream.method import LoRA
from minidream.methods.dora import dora_layer, dora_parameters
from minidream.methods.dora_file import save_dora


class DoRA(LoRA):
    """LoRA's targets, rank, alpha and learning rates (the UNet's, with --train-text-encoder both
    text encoders' attention too), with A, B and m trained. A checkpoint keeps all three (LoRA's
    state_dict takes every .lora_ tensor, .lora_magnitude_vector included); the result is a
    diffusers-layout DoRA file (use_dora in its metadata), which sample.py --lora and diffusers'
    load_lora_weights read."""

    make_layer = staticmethod(dora_layer)  # m starts at ||W0||_c, so the model starts as the base
    adapter_parameters = staticmethod(dora_parameters)  # A, B and m: LoRA marks and groups them

    def save(self, path, step):
        return save_dora(path, **self.modules, token=self.token, class_noun=self.class_noun,
                         steps=step, base_model=self.model.name)

    def summary(self) -> str:
        return f"{sum(p.numel() for p in self.parameters()):,} DoRA parameters (LoRA's A, B and m)"
