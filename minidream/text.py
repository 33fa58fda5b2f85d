"""Text conditioning: prompts -> the vectors the UNet reads, via transformers' CLIP text encoders.

SDXL (Podell et al. 2023, sec. 2.1) concatenates the penultimate hidden states of two encoders:

    tokenizer   + CLIPTextModel               CLIP ViT-L/14            -> (B, 77, 768)
    tokenizer_2 + CLIPTextModelWithProjection OpenCLIP ViT-bigG/14     -> (B, 77, 1280)
    context = concat(...)                                                 (B, 77, 2048)
    pooled  = text_projection(encoder 2 at the end-of-text token)         (B, 1280)

SD 1.x / 2.x use one encoder's last hidden state (SD 2's saved OpenCLIP-H lacks its last layer)."""

import warnings
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass
class TextEncoders:
    tokenizer: CLIPTokenizer  # CLIP BPE, 49408 tokens, pads with <|endoftext|>
    text_encoder: CLIPTextModel  # CLIP ViT-L/14 text tower (SD 1.x: the only encoder)
    tokenizer_2: CLIPTokenizer | None = None  # SDXL: same vocab, pads with "!" (id 0) as OpenCLIP
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL only: OpenCLIP ViT-bigG/14

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def output_encoder(self) -> torch.nn.Module:
        """The encoder whose dtype and device the embeddings are returned in (as diffusers does)."""
        return self.text_encoder_2 if self.is_sdxl else self.text_encoder


# ---------------------------------------------------------------------------------------------
# Prompt -> embeddings.

def _tokenize(tokenizer: CLIPTokenizer, texts: list[str], length: int, warn=True) -> torch.Tensor:
    """(B, length) ids: <start> tokens <end>, padded; longer prompts are truncated with a warning
    naming the dropped words (CLIP has only `length` position embeddings)."""
    for text, ids in zip(texts, tokenizer(texts, verbose=False).input_ids):  # no 2nd warning
        if warn and len(ids) > length:
            dropped = tokenizer.decode(ids[length - 1 : -1])
            more = f"... ({len(ids) - length} tokens in all)" if len(dropped) > 60 else ""
            warnings.warn(f"prompt {text[:40]!r}... is {len(ids)} tokens, CLIP reads {length}: "
                          f"dropped {dropped[:60]!r}{more}")
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(encoders: TextEncoders, texts: list[str]):
    """(context, pooled) of texts, with gradients (for LoRA); pooled: None in SD 1.x/2.x."""
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


@torch.no_grad()
def encode_prompt(encoders: TextEncoders, prompts, negative_prompts=None, *, guidance: bool = True,
                  force_zeros_for_empty_prompt: bool = True, num_images_per_prompt: int = 1):
    """(context, pooled, uncond_context, uncond_pooled) for classifier-free guidance.

    prompts / negative_prompts: a string or a list (one negative applies to every prompt). The
    unconditional pair is None without guidance; zeros for SDXL when no negative is given and
    force_zeros_for_empty_prompt (an explicit "" is encoded like any prompt); else the encoded
    negatives ("" if none). Rows repeat num_images_per_prompt times in place: p0, p0, p1, p1, ..."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompt given: pass at least one prompt")
    context, pooled = encode_text(encoders, prompts)
    uncond_context = uncond_pooled = None
    if guidance and negative_prompts is None and force_zeros_for_empty_prompt and encoders.is_sdxl:
        uncond_context, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    elif guidance:
        negatives = "" if negative_prompts is None else negative_prompts
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: "
                             "give one negative prompt or one per prompt")
        uncond_context, uncond_pooled = encode_text(encoders, negatives)
    return tuple(None if x is None else x.repeat_interleave(num_images_per_prompt, dim=0)
                 for x in (context, pooled, uncond_context, uncond_pooled))


# ---------------------------------------------------------------------------------------------
# Micro-conditioning.

def sdxl_time_ids(original_size, crop_top_left, target_size, dtype=torch.float32) -> torch.Tensor:
    """SDXL's size/crop ids (Podell et al. 2023 sec. 2.2): (orig_h, orig_w, top, left, h, w).

    Each argument is a pair or a (B, 2) batch of pairs (they broadcast); returns (6,) or (B, 6)."""
    parts = [torch.as_tensor(x, dtype=dtype) for x in (original_size, crop_top_left, target_size)]
    for name, p in zip(("original_size", "crop_top_left", "target_size"), parts):
        if p.shape[-1:] != (2,):
            raise ValueError(f"{name} must be a pair or a (B, 2) batch, got shape {tuple(p.shape)}")
    return torch.cat(torch.broadcast_tensors(*parts), dim=-1)
