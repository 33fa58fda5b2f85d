"""Write a whole model as a diffusers folder: the result of full fine-tuning.

    model/
        model_index.json              which class each part is (the file that makes it a diffusers model)
        unet/config.json + diffusion_pytorch_model.safetensors     written: the trained weights
        text_encoder*/config.json + model.safetensors              written when trained, else as the source
        vae/, tokenizer*/, scheduler/                              as the source

A complete folder, so that both `minidream.formats.load_model(folder)` and diffusers'
`StableDiffusionXLPipeline.from_pretrained(folder)` (or StableDiffusionPipeline for SD 1.x / 2.x)
load it, and it stays usable when the base model is moved or deleted. The parts that did not train
are *hard links* to the source folder's files where the file system allows it (no extra disk space:
SDXL's VAE and text encoders are 1.9 GB in fp16), else copies. A hard link is a second name for the
same file, not a pointer to a path, and minidream never edits a weight file in place (every file is
written anew and renamed), so neither copy can change the other. From a single-file checkpoint the
untouched parts are written out from its tensors, under diffusers' names.

Text encoders are written under transformers 4's names (`text_model.*`) as real SDXL repos are, so
transformers 4 and 5 both read them (see DESIGN.md, "key layouts drift").

The writers of a diffusers folder's parts (`write_part`, `write_model_index`) also write the bundled
tiny model (minidream.toy.tiny).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minidream.formats import detect, text_encoder_parts, text_encoder_weights, unet_weights, vae_weights
from minidream.files import atomic_write, write_json
from minidream.formats.loading import Weights, read_tensors
from minidream.formats.models import find_tokenizer_dir

# ----------------------------------------------------------------------------- a diffusers folder's layout

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline"}
LIBRARY_CLASSES = {  # model_index.json: part -> [library, class]
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
}
WEIGHT_FILES = {  # part -> the safetensors file in its folder
    "unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors",
}
SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def materialize(weights: Weights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of `weights` into an ordinary state dict, floating-point ones in `dtype` if given."""
    return {name: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            for name, tensor in read_tensors(weights)}


def transformers4_names(state: dict) -> dict:
    """transformers 4 layout: every CLIP text tensor under `text_model.` (text_projection outside)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def text_encoder_state_dicts(path, dtype=None, *, expect="sdxl", variant=None) -> dict:
    """{part: (CLIPTextConfig dict, state dict)} of every text encoder at `path`, tensors read, in transformers 4
    names whatever the files use. The constant position_ids buffer that real repos' files still carry is left out,
    as single files' is: it is no weight."""
    out = {}
    for part in text_encoder_parts(path):
        config, weights = text_encoder_weights(path, part, expect=expect, variant=variant)
        weights = {k: v for k, v in weights.items() if not k.endswith("embeddings.position_ids")}
        out[part] = (config, transformers4_names(materialize(weights, dtype)))
    return out


def write_part(folder: Path, config: dict, state: dict[str, torch.Tensor], weight_file: str,
               dtype: torch.dtype) -> None:
    """config.json + one safetensors file of float tensors in `dtype` (integer buffers kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    atomic_write(folder / weight_file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def write_model_index(folder, parts=SDXL_PARTS, pipeline: str = "StableDiffusionXLPipeline") -> Path:
    """model_index.json, the file that makes a folder a diffusers model: which class each part is."""
    index = {"_class_name": pipeline}
    if pipeline.startswith("StableDiffusionXL"):
        index |= {"add_watermarker": None, "force_zeros_for_empty_prompt": True}  # as SDXL base
    index |= {part: LIBRARY_CLASSES[part] for part in parts}
    return write_json(Path(folder) / "model_index.json", index)


# ----------------------------------------------------------------------------- a fine-tuned model


def link_or_copy(source: Path, target: Path) -> None:
    """target = the same file as source (hard link), or a copy where links are impossible
    (another file system, or one without hard links)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def link_tree(source: Path, target: Path) -> None:
    for file in sorted(source.rglob("*")):
        if file.is_file():
            link_or_copy(file, target / file.relative_to(source))


def part_config(source: Path, part: str) -> dict:
    """The source's config.json of `part` (inferred from tensor shapes for a single file)."""
    if part == "unet":
        config = unet_weights(source, expect=None)[0]
        return {"_class_name": LIBRARY_CLASSES["unet"][1], **config}
    return text_encoder_weights(source, part, expect=None)[0]


def trained_state(part: str, module: nn.Module) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return transformers4_names(state) if part.startswith("text_encoder") else state


def save_model_folder(folder, model, trained: dict[str, nn.Module], dtype: torch.dtype,
                      tokenizer_dir=None) -> Path:
    """Write `model` (loaded from model.name) to `folder` with the parts in `trained` replaced.

    trained: {"unet": module, ["text_encoder": ..., "text_encoder_2": ...]}, written in `dtype`
    (the run's weight dtype: fp16 halves the files; the fp32 master weights are in the checkpoint).
    The folder is assembled beside its final name and renamed into place when complete.
    """
    folder, source = Path(folder), Path(model.name)
    info = detect(source)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for part, module in trained.items():
            write_part(tmp / part, part_config(source, part), trained_state(part, module), WEIGHT_FILES[part], dtype)
        if info.layout == "diffusers":
            copy_untouched_parts(source, tmp, skip=set(trained))
        else:
            write_untouched_parts(source, model, tmp, skip=set(trained), family=info.family, tokenizer_dir=tokenizer_dir)
        if folder.exists():  # an earlier save of this run: replaced only now that the new one is complete
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def copy_untouched_parts(source: Path, folder: Path, skip: set[str]) -> None:
    """model_index.json and every part folder it names, except those in `skip`, from a diffusers folder."""
    index = json.loads((source / "model_index.json").read_text())
    link_or_copy(source / "model_index.json", folder / "model_index.json")
    for part, value in index.items():
        if isinstance(value, list) and value[0] and part not in skip and (source / part).is_dir():
            link_tree(source / part, folder / part)


def write_untouched_parts(source: Path, model, folder: Path, skip: set[str], family: str, tokenizer_dir) -> None:
    """The parts of a single-file checkpoint that did not train, as a diffusers folder's parts."""
    parts = {}
    if "vae" not in skip:
        config, weights = vae_weights(source, expect=None)
        parts["vae"] = ({"_class_name": LIBRARY_CLASSES["vae"][1], **config}, materialize(weights))
    parts |= {k: v for k, v in text_encoder_state_dicts(source, expect=None).items() if k not in skip}
    for part, (config, state) in parts.items():  # in the dtype the file stores them
        stored = next(v.dtype for v in state.values() if v.is_floating_point())
        write_part(folder / part, config, state, WEIGHT_FILES[part], stored)
    tokenizers = ("tokenizer", "tokenizer_2") if model.text.is_sdxl else ("tokenizer",)
    found = find_tokenizer_dir([tokenizer_dir, source.parent], need_second=model.text.is_sdxl)
    for part in tokenizers:
        link_tree(found / part, folder / part)
    scheduler = {"_class_name": "EulerDiscreteScheduler" if family == "sdxl" else "PNDMScheduler",
                 **asdict(model.schedule)}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    names = ("unet", "vae", *(p for p in ("text_encoder", "text_encoder_2") if getattr(model.text, p) is not None),
             *tokenizers, "scheduler")
    write_model_index(folder, names, PIPELINES.get(family, "StableDiffusionXLPipeline"))
