"""Text conditioning: the CLIP text encoders of SDXL (and SD 1.x / 2.x) and the vectors they produce.

SDXL (Podell et al. 2023, sec. 2.1) reads a prompt with two encoders and concatenates their
penultimate hidden states into the cross-attention context:

    tokenizer   + CLIPTextModel               CLIP ViT-L/14 (OpenAI)   hidden 768   -> (B, 77, 768)
    tokenizer_2 + CLIPTextModelWithProjection OpenCLIP ViT-bigG/14     hidden 1280  -> (B, 77, 1280)
    context = concat(...)                                                            (B, 77, 2048)
    pooled  = text_projection(encoder 2 at the end-of-text token)                    (B, 1280)

SD 1.x / 2.x have one encoder and use its last hidden state after the final LayerNorm. (SD 2's
"penultimate layer" is already baked into its diffusers folder: the saved OpenCLIP-H has 23 of
its 24 layers, so "last" is the penultimate one.)

The encoders are transformers' own modules; this file only builds, loads and calls them. Weights
are loaded onto the meta device first and then *assigned* the loaded tensors, so the 1.4 GB (fp16)
bigG encoder never exists twice in RAM.
"""

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
HEAD_DIM = 64  # every CLIP / OpenCLIP text tower (ViT-L, ViT-H, ViT-bigG) uses 64-wide heads


@dataclass
class TextEncoders:
    tokenizer: CLIPTokenizer  # CLIP BPE, 49408 tokens, pads with <|endoftext|>
    text_encoder: CLIPTextModel  # CLIP ViT-L/14 text tower (SD 1.x: the only encoder)
    tokenizer_2: CLIPTokenizer | None = None  # same vocabulary, pads with "!" (id 0, as OpenCLIP); SD 1/2: None
    text_encoder_2: CLIPTextModelWithProjection | None = None  # OpenCLIP ViT-bigG/14; None for SD 1.x/2.x

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def output_encoder(self) -> torch.nn.Module:
        """The encoder whose dtype and device the embeddings are returned in (as diffusers does)."""
        return self.text_encoder_2 if self.is_sdxl else self.text_encoder


# ---------------------------------------------------------------------------------------------
# Tokenizers: SDXL single files carry no vocabulary, so it comes from a diffusers folder.

class TokenizerNotFoundError(FileNotFoundError):
    pass


def _has_tokenizer_files(folder: Path) -> bool:
    bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return bpe_files or (folder / "tokenizer.json").is_file()


def find_tokenizer_dir(candidates, need_second: bool = True) -> Path:
    """First folder among `candidates` (None entries skipped) that holds tokenizer/ (and tokenizer_2/)."""
    subfolders = ("tokenizer", "tokenizer_2") if need_second else ("tokenizer",)
    tried = [Path(c) for c in candidates if c is not None]
    for folder in tried:
        if all(_has_tokenizer_files(folder / s) for s in subfolders):
            return folder
    where = ", ".join(str(t) for t in tried) or "nowhere (no --tokenizer DIR given)"
    raise TokenizerNotFoundError(
        f"no CLIP tokenizer found (looked in: {where}). Single-file checkpoints carry no tokenizer: pass "
        f"--tokenizer DIR, where DIR holds {' and '.join(s + '/' for s in subfolders)}, each with vocab.json "
        f"+ merges.txt + tokenizer_config.json + special_tokens_map.json (tokenizer_2 pads with '!'). Get them "
        f"from the {' and '.join(s + '/' for s in subfolders)} folders of https://huggingface.co/{SDXL_REPO}, e.g. "
        f"`huggingface-cli download {SDXL_REPO} --include 'tokenizer*/*' --local-dir weights/sdxl-base-1.0` "
        f"then --tokenizer weights/sdxl-base-1.0 (any diffusers SDXL folder works)."
    )


def load_tokenizer(folder) -> CLIPTokenizer:
    folder = Path(folder)
    if not _has_tokenizer_files(folder):
        raise TokenizerNotFoundError(f"{folder} has no CLIP tokenizer: need vocab.json + merges.txt (or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Encoders: config -> meta-device module -> assign the checkpoint's tensors.

def _find(sd: dict, suffix: str) -> torch.Tensor:
    matches = [k for k in sd if k.endswith(suffix)]
    if len(matches) != 1:
        raise KeyError(f"expected exactly one tensor named *{suffix} in the text-encoder state dict, found {matches}")
    return sd[matches[0]]


def clip_config_from_state_dict(sd: dict, hidden_act: str, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A CLIPTextConfig read off tensor shapes, for checkpoints that ship no config.json.

    Shapes give vocab size, width, positions, depth, MLP width and projection size. Two things
    shapes cannot tell are fixed by what the encoder *is*: the head count (all CLIP text towers use
    64-wide heads, so heads = width / 64), and the activation, which the caller names: OpenAI's
    CLIP-L (SDXL's `conditioner.embedders.0`, SD 1.x) was trained with quick_gelu
    x * sigmoid(1.702 x), LAION's OpenCLIP bigG / ViT-H (`embedders.1`, SD 2.x) with exact gelu.
    Special-token ids come from the tokenizer, so pooling finds the real end-of-text token.
    """
    vocab, width = _find(sd, "embeddings.token_embedding.weight").shape
    if width % HEAD_DIM:
        raise ValueError(f"text encoder width {width} is not a multiple of {HEAD_DIM}: cannot infer its head count")
    layers = {int(m.group(1)) for k in sd if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    projection = sd.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_find(sd, "layers.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=width // HEAD_DIM,
        max_position_embeddings=_find(sd, "embeddings.position_embedding.weight").shape[0],
        projection_dim=projection.shape[0] if projection is not None else width,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _to_model_layout(sd: dict, wanted: set[str]) -> dict:
    """Rename keys into the layout of the installed transformers.

    transformers 4 names CLIPTextModel's tensors `text_model.*` (as real SDXL repos and single files
    do); transformers 5 dropped that prefix for CLIPTextModel but kept it inside
    CLIPTextModelWithProjection. `position_ids` is a constant buffer older files saved; it is rebuilt.
    """
    out = {}
    for key, value in sd.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key not in wanted:
            other = key.removeprefix("text_model.") if key.startswith("text_model.") else "text_model." + key
            key = other if other in wanted else key
        out[key] = value
    missing, unexpected = sorted(wanted - out.keys()), sorted(out.keys() - wanted)
    if missing or unexpected:
        raise KeyError(f"text encoder weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                       f" ({len(missing)} missing, {len(unexpected)} unexpected)")
    return out


def build_clip_text_model(config: CLIPTextConfig, sd: dict, with_projection: bool, dtype=torch.float32, device="cpu"):
    """CLIPTextModel(WithProjection) holding the tensors of `sd` (either key layout), frozen, in eval mode.

    The module is created on the meta device (no memory), then load_state_dict(assign=True) makes
    the loaded tensors its parameters without copying them into freshly allocated ones.
    """
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    wanted = set(model.state_dict().keys())
    sd = {k: _cast(v, dtype, device) for k, v in _to_model_layout(sd, wanted).items()}  # no-op when already cast
    model.load_state_dict(sd, strict=True, assign=True)
    # The non-persistent position_ids buffer (0..76) is not in any state dict: still on meta.
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            assert attr == "position_ids", f"unexpected uninitialised buffer {name}"
            positions = torch.arange(buffer.shape[-1], device=device).expand(1, -1)
            model.get_submodule(module_name).register_buffer(attr, positions, persistent=False)
    # Frozen: minidream trains LoRA adapters on the UNet only.
    return model.eval().requires_grad_(False)


def _cast(t: torch.Tensor, dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _weight_files(folder: Path, dtype) -> list[Path]:
    """The weight file(s) of a transformers model folder (the fp16 variant first when loading fp16)."""
    names = ["model.safetensors", "model.fp16.safetensors"]
    if dtype == torch.float16:
        names.reverse()
    for name in [*names, "pytorch_model.bin"]:
        if (folder / name).is_file():
            return [folder / name]
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {tensor name: file name}}
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{folder} holds no model.safetensors, model.fp16.safetensors or pytorch_model.bin: "
                            f"download the weights of this text encoder folder")


def _read_weights(files: list[Path], dtype, device) -> dict:
    """All tensors of `files`, each cast to dtype/device as it is read, so that an fp16 file loaded
    as fp32 (or a file loaded onto the GPU) never sits in RAM twice."""
    sd = {}
    for file in files:
        if file.suffix == ".bin":  # pickled torch file: mmap'd, so tensors are paged in one by one
            sd |= {k: _cast(v, dtype, device) for k, v in torch.load(file, mmap=True, weights_only=True).items()}
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            sd |= {k: _cast(f.get_tensor(k), dtype, device) for k in f.keys()}
    return sd


def load_clip_folder(folder, with_projection: bool, dtype=torch.float32, device="cpu"):
    """A text_encoder*/ folder (config.json + weights) written by transformers 4 or 5."""
    folder = Path(folder)
    config = CLIPTextConfig.from_pretrained(str(folder))
    sd = _read_weights(_weight_files(folder, dtype), dtype, device)
    return build_clip_text_model(config, sd, with_projection, dtype, device)


def load_text_encoders(folder, dtype=torch.float32, device="cpu") -> TextEncoders:
    """Tokenizers and encoders of a diffusers model folder (SDXL, or SD 1.x / 2.x without the _2 parts)."""
    folder = Path(folder)
    if not (folder / "text_encoder" / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder: it has no text_encoder/config.json")
    sdxl = (folder / "text_encoder_2").is_dir()
    tok_dir = find_tokenizer_dir([folder], need_second=sdxl)
    return TextEncoders(
        tokenizer=load_tokenizer(tok_dir / "tokenizer"),
        text_encoder=load_clip_folder(folder / "text_encoder", False, dtype, device),
        tokenizer_2=load_tokenizer(tok_dir / "tokenizer_2") if sdxl else None,
        text_encoder_2=load_clip_folder(folder / "text_encoder_2", True, dtype, device) if sdxl else None,
    )


def text_encoders_from_state_dicts(sd1: dict, sd2: dict | None, tokenizer_dir, dtype=torch.float32,
                                   device="cpu") -> TextEncoders:
    """Encoders from a single-file checkpoint's text tensors, already in transformers naming.

    sd1: CLIP-L (`conditioner.embedders.0.transformer.*` of an SDXL file, prefix removed);
    sd2: OpenCLIP bigG converted to CLIPTextModelWithProjection names, or None for SD 1.x.
    tokenizer_dir: a folder with tokenizer/ (and tokenizer_2/), e.g. a diffusers SDXL folder.
    """
    tok_dir = find_tokenizer_dir([tokenizer_dir], need_second=sd2 is not None)
    tokenizer = load_tokenizer(tok_dir / "tokenizer")
    encoders = TextEncoders(tokenizer, build_clip_text_model(
        clip_config_from_state_dict(sd1, "quick_gelu", tokenizer), sd1, False, dtype, device))
    if sd2 is not None:
        encoders.tokenizer_2 = load_tokenizer(tok_dir / "tokenizer_2")
        config = clip_config_from_state_dict(sd2, "gelu", encoders.tokenizer_2)
        encoders.text_encoder_2 = build_clip_text_model(config, sd2, True, dtype, device)
    return encoders


# ---------------------------------------------------------------------------------------------
# Prompt -> embeddings.

def _tokenize(tokenizer: CLIPTokenizer, texts: list[str], length: int, warn: bool = True) -> torch.Tensor:
    """(B, length) ids: <start> tokens <end> padded with the tokenizer's pad token.

    Prompts longer than length - 2 tokens are truncated (the end token is kept), with a warning
    naming the dropped words: CLIP has only `length` position embeddings.
    """
    for text, ids in zip(texts, tokenizer(texts, verbose=False).input_ids):  # verbose: no second warning
        if warn and len(ids) > length:
            dropped = tokenizer.decode(ids[length - 1 : -1])
            warnings.warn(f"prompt {text[:40]!r}... is {len(ids)} tokens, CLIP reads {length}: dropped {dropped!r}")
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _encode(encoders: TextEncoders, texts: list[str]):
    """(context, pooled) for a list of texts; pooled is None for SD 1.x / 2.x."""
    out_dtype, out_device = encoders.output_encoder.dtype, encoders.output_encoder.device
    if not encoders.is_sdxl:
        enc = encoders.text_encoder
        ids = _tokenize(encoders.tokenizer, texts, enc.config.max_position_embeddings)
        context = enc(ids.to(enc.device)).last_hidden_state  # (B, 77, D), after the final LayerNorm
        return context.to(out_dtype), None
    hidden = []
    # Both tokenizers share one vocabulary: warn about a long prompt once, not twice.
    for tokenizer, enc, warn in ((encoders.tokenizer, encoders.text_encoder, True),
                                 (encoders.tokenizer_2, encoders.text_encoder_2, False)):
        ids = _tokenize(tokenizer, texts, enc.config.max_position_embeddings, warn)
        out = enc(ids.to(enc.device), output_hidden_states=True)
        # hidden_states = (embeddings, layer 1, ..., layer N); [-2] is the input of the last layer,
        # taken *before* the final LayerNorm, as SDXL was trained.
        hidden.append(out.hidden_states[-2].to(out_device))  # (B, 77, D_i)
    context = torch.cat(hidden, dim=-1).to(out_dtype)  # (B, 77, D_1 + D_2)
    return context, out.text_embeds  # text_embeds: (B, projection_dim), from encoder 2


def _as_batch(texts, batch: int, what: str) -> list[str]:
    texts = [texts] * batch if isinstance(texts, str) else list(texts)
    if len(texts) != batch:
        raise ValueError(f"{len(texts)} {what} for {batch} prompts: give one {what[:-1]} or one per prompt")
    return texts


@torch.no_grad()
def encode_prompt(encoders: TextEncoders, prompts, negative_prompts=None, *, guidance: bool = True,
                  force_zeros_for_empty_prompt: bool = True, num_images_per_prompt: int = 1):
    """(context, pooled, uncond_context, uncond_pooled) for classifier-free guidance.

    prompts / negative_prompts: a string or a list (a single negative applies to every prompt).
    Both encoders read the same text. SDXL: context (B, 77, 2048) is the concat of both penultimate
    hidden states, pooled (B, 1280) encoder 2's projected end-of-text feature. The unconditional
    pair is None when guidance is off; zeros when no negative prompt is given and
    force_zeros_for_empty_prompt (SDXL base sets it; an explicit "" is encoded like any prompt);
    otherwise the encoded negatives ("" when none is given). SD 1.x / 2.x: pooled is None and the
    unconditional context is always encoded (from "" when no negative is given).
    Each row is repeated num_images_per_prompt times in place: p0, p0, p1, p1, ...
    Prompts over 75 tokens are truncated with a warning (CLIP has 77 positions incl. start/end).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompt given: pass at least one prompt")
    context, pooled = _encode(encoders, prompts)
    uncond_context = uncond_pooled = None
    if guidance and negative_prompts is None and force_zeros_for_empty_prompt and encoders.is_sdxl:
        uncond_context, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    elif guidance:
        negatives = _as_batch("" if negative_prompts is None else negative_prompts, len(prompts), "negative prompts")
        uncond_context, uncond_pooled = _encode(encoders, negatives)

    def repeat(x):
        return None if x is None else x.repeat_interleave(num_images_per_prompt, dim=0)

    return repeat(context), repeat(pooled), repeat(uncond_context), repeat(uncond_pooled)


# ---------------------------------------------------------------------------------------------
# Micro-conditioning.

def sdxl_time_ids(original_size, crop_top_left, target_size, dtype=torch.float32) -> torch.Tensor:
    """SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2): (orig_h, orig_w, top, left, h, w).

    Each argument is an (h, w) / (top, left) pair, or a (B, 2) batch of them; they broadcast, so
    per-image original sizes and crops can share one target size. Returns (6,) or (B, 6). In training
    they are the real image size and the real crop; at inference SDXL is asked for an uncropped
    image at the output size: original = target = (H, W), crop = (0, 0).
    """
    parts = [torch.as_tensor(x, dtype=dtype) for x in (original_size, crop_top_left, target_size)]
    for name, p in zip(("original_size", "crop_top_left", "target_size"), parts):
        if p.shape[-1:] != (2,):
            raise ValueError(f"{name} must be a pair (or a (B, 2) batch of pairs), got shape {tuple(p.shape)}")
    return torch.cat(torch.broadcast_tensors(*parts), dim=-1)
