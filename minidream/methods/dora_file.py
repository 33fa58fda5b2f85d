"""The file a DoRA run writes (methods/dora.py): a LoRA file (formats/lora_files.py) plus each
module's magnitude m, in one of the layouts minidream, diffusers and ComfyUI read:

  "diffusers"   peft's keys: <component>.<module>.lora_magnitude_vector, (out,) for a Linear and
                (1, out, 1, 1) for a Conv2d, and "use_dora": true in each component's LoraConfig
                metadata, from which diffusers' load_lora_weights builds DoRA layers. The text
                encoders' keys end in .lora_magnitude_vector.weight: transformers 5 (5.24) loads
                adapters without peft's remapping, so it misses the key without .weight (the
                text encoders would run with m = ||W0||); peft reads both spellings.
  "kohya"       <stem>.dora_scale, (out, 1) or (out, 1, 1, 1): LyCORIS's layout (wd_on_out=True,
  "kohya_sgm"   its default), which ComfyUI reads. diffusers 0.42 drops dora_scale keys.
"""

import json

import torch

from minidream.formats.lora_files import (COMPONENTS, KOHYA_PREFIX, lora_to_tensors,
                                          unet_module_to_sgm)
from minidream.lora_file import DIFFUSERS_METADATA_KEY, file_module_name, save_lora
from minidream.methods.dora import dora_layers


def magnitude_key(component: str, path: str, layout: str, unet=None) -> str:
    """The file key of module `path`'s magnitude, named as lora_files names its A and B."""
    name = file_module_name(component, path)
    if layout == "diffusers":
        suffix = "" if component == "unet" else ".weight"  # for transformers 5: see above
        return f"{component}.{name}.lora_magnitude_vector{suffix}"
    if component == "unet" and layout == "kohya_sgm":
        name = unet_module_to_sgm(path, unet)
    return f"{KOHYA_PREFIX[component]}{name.replace('.', '_')}.dora_scale"


def dora_tensors(adapters: dict, models: dict, layout: str = "diffusers", dtype=None):
    """lora_to_tensors' (tensors, metadata) plus every DoRA layer's magnitude and use_dora."""
    tensors, metadata = lora_to_tensors(adapters, layout, models.get("unet"))
    for component, model in models.items():
        for path, layer in dora_layers(model) if model is not None else []:
            m = layer.lora_magnitude_vector.detach().to(dtype)
            m = m if layout == "diffusers" else m.reshape(-1, *[1] * (layer.weight.dim() - 1))
            tensors[magnitude_key(component, path, layout, models.get("unet"))] = m
    if metadata:  # diffusers' LoraConfig per component: rank, alpha, targets, and now use_dora
        config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        config.update({f"{component}.use_dora": True for component, w in adapters.items() if w})
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(config, sort_keys=True)
    return tensors, metadata


def save_dora(path, *, layout: str = "diffusers", unet: torch.nn.Module | None = None,
              text_encoder=None, text_encoder_2=None, dtype=None, **metadata):
    """Write the DoRA adapters of the given models to `path` in `layout`; the rest of the metadata
    (base_model, token, class_noun, steps) as minidream.lora_file.save_lora writes it."""
    models = dict(zip(COMPONENTS, (unet, text_encoder, text_encoder_2)))
    return save_lora(path, **models, dtype=dtype, **metadata,
                     to_tensors=lambda adapters: dora_tensors(adapters, models, layout, dtype))
