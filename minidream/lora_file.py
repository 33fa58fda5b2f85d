"""The LoRA file a run writes: diffusers' layout, which diffusers, peft and minidream all read.

    unet.<module>.lora_A.weight (r, in)  unet.<module>.lora_B.weight (out, r)   per adapted module
    text_encoder.text_model.<module>...  text_encoder_2.text_model...           --train-text-encoder

Alpha is no tensor: diffusers rebuilds each component's peft LoraConfig from the metadata
(diffusers_config). Other layouts (kohya, older diffusers): minidream/formats/lora_files.py."""

import json
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from minidream import __version__
from minidream.files import atomic_write
from minidream.lora import lora_layers

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # the entry diffusers' load_lora_weights reads


@dataclass
class LoRAWeights:
    """One module's adapter, the unit files hold: delta W = up @ down * alpha / rank."""

    down: torch.Tensor  # A: (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up: torch.Tensor  # B: (out, r) for Linear, (out, r, 1, 1) for Conv2d
    alpha: float

    rank = property(lambda self: self.down.shape[0])


# {module name: its adapter} of each LoRA layer of `model`, detached (and cast to `dtype`)
def get_adapter_weights(model: nn.Module, dtype=None) -> dict[str, LoRAWeights]:
    return {n: LoRAWeights(m.lora_A.weight.detach().to(dtype), m.lora_B.weight.detach().to(dtype),
                           m.alpha) for n, m in lora_layers(model)}


def most_common(values): return Counter(values).most_common(1)[0][0]


def file_module_name(component: str, path: str) -> str:  # CLIP's with text_model. (transformers 4)
    return path if component == "unet" else "text_model." + path.removeprefix("text_model.")


def diffusers_config(weights: dict[str, LoRAWeights]) -> dict:
    """The fields of the peft LoraConfig (r, alpha, targets) diffusers rebuilds an adapter from."""
    # Text-encoder targets without text_model. match with or without it (peft suffix rule).
    targets = {p: p.removeprefix("text_model.") for p in weights}
    ranks, alphas = ({p: getattr(w, k) for p, w in weights.items()} for k in ("rank", "alpha"))
    r, alpha = most_common(ranks.values()), most_common(alphas.values())
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets.values()),
            "rank_pattern": {re.escape(targets[p]): v for p, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(targets[p]): v for p, v in alphas.items() if v != alpha}}


def diffusers_tensors(adapters: dict[str, dict[str, LoRAWeights]]) -> tuple[dict, dict]:
    """{component: {module path: LoRAWeights}} -> (file tensors, metadata) in diffusers' layout."""
    tensors, config = {}, {}
    for component, weights in adapters.items():
        for path, w in weights.items():
            name = f"{component}.{file_module_name(component, path)}"
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = w.down, w.up
        if weights:
            config.update({f"{component}.{k}": v for k, v in diffusers_config(weights).items()})
    return tensors, {DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)} if config else {}


def save_lora(path, *, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
              text_encoder_2: nn.Module | None = None, base_model="", token="", class_noun="",
              steps: int | None = None, dtype=None, to_tensors=diffusers_tensors):
    """Write the adapters of the given models to `path`, with rank, alpha, base model, token, class
    noun, steps and minidream version in the metadata. to_tensors: the layout (formats/: kohya)."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    adapters = {c: get_adapter_weights(m, dtype) for c, m in models.items() if m is not None}
    tensors, metadata = to_tensors(adapters)
    flat = [w for ws in adapters.values() for w in ws.values()]
    metadata.update(format="pt", minidream_version=__version__, base_model=base_model, token=token,
                    class_noun=class_noun, steps="" if steps is None else str(steps),
                    **{k: str(most_common(getattr(w, k) for w in flat)) for k in ("rank", "alpha")})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
