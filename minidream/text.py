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

The encoders are transformers' own modules, loaded by checkpoint.py; this file finds the
tokenizers and turns prompts into the vectors the UNet reads.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
        f"`huggingface-cli download {SDXL_REPO} --include 'tokenizer*/*' --local-dir weights/sdxl-tokenizers` "
        f"then --tokenizer weights/sdxl-tokenizers (any diffusers SDXL folder works; not weights/sdxl-base-1.0, "
        f"which minidream would take for a whole model)."
    )


def load_tokenizer(folder) -> CLIPTokenizer:
    folder = Path(folder)
    if not _has_tokenizer_files(folder):
        raise TokenizerNotFoundError(f"{folder} has no CLIP tokenizer: need vocab.json + merges.txt (or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Encoders: config -> meta-device module -> assign the checkpoint's tensors.

def load_text_encoders(path, dtype=torch.float32, device="cpu", *, tokenizer_dir=None, variant=None,
                       expect=None) -> TextEncoders:
    """Tokenizers and frozen CLIP text encoders of a model: a diffusers folder or a single file.

    The weights come through checkpoint.load_text_encoder (strict, low-RAM, single-file names
    converted, transformers 4 and 5 layouts both accepted). The tokenizers come from
    `tokenizer_dir` if given, else from the model folder itself, else from the folder holding a
    single file (single files carry no vocabulary). SD 1.x / 2.x models have one encoder.
    """
    from minidream.checkpoint import CheckpointError, detect, load_text_encoder, text_encoder_parts

    path = Path(path)
    parts = text_encoder_parts(path)
    if "text_encoder" not in parts:
        raise CheckpointError(f"{path} is {detect(path).description}: it holds no text encoder")
    sdxl = "text_encoder_2" in parts
    tok_dir = find_tokenizer_dir([tokenizer_dir, path if path.is_dir() else path.parent], need_second=sdxl)

    def encoder(part):  # frozen: minidream trains LoRA on the UNet (text-encoder LoRA adds its own params)
        model = load_text_encoder(path, part, dtype, device, expect=expect, variant=variant)
        return model.eval().requires_grad_(False)

    return TextEncoders(
        tokenizer=load_tokenizer(tok_dir / "tokenizer"),
        text_encoder=encoder("text_encoder"),
        tokenizer_2=load_tokenizer(tok_dir / "tokenizer_2") if sdxl else None,
        text_encoder_2=encoder("text_encoder_2") if sdxl else None,
    )


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


def encode_text(encoders: TextEncoders, texts: list[str]):
    """(context, pooled) for a list of texts, with gradients (training a text-encoder LoRA);
    pooled is None for SD 1.x / 2.x. encode_prompt wraps it for inference."""
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
    context, pooled = encode_text(encoders, prompts)
    uncond_context = uncond_pooled = None
    if guidance and negative_prompts is None and force_zeros_for_empty_prompt and encoders.is_sdxl:
        uncond_context, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    elif guidance:
        negatives = _as_batch("" if negative_prompts is None else negative_prompts, len(prompts), "negative prompts")
        uncond_context, uncond_pooled = encode_text(encoders, negatives)

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
