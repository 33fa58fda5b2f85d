"""Textual inversion: learn a new word, nothing else (Gal et al. 2022, "An Image is Worth One Word").

The model stays frozen. A placeholder token (`<rraj>`) is added to the tokenizer(s), and its row of
each text encoder's token-embedding table, v*, is the only trained parameter (the paper's eq. 2:
v* = argmin_v E ||eps - eps_theta(z_t, t, c_theta(y with v))||^2, here with DreamBooth's data and
loss, step.py). SDXL has two encoders, so the word gets two vectors: 768 wide for CLIP-L, 1280 for
OpenCLIP bigG. The result is a few KB instead of a LoRA's MBs or a model's GBs; it only reaches
what the frozen model can already draw (no new details of the subject's face, say).

Why a placeholder and not the subject token itself: DreamBooth's `rraj` is an existing rare word
(in the bundled tiny vocabulary it is even one token), and textual inversion adds a *new* entry;
`<rraj>` is new in any CLIP vocabulary, and `<...>` is the usual spelling of textual-inversion
words. It starts from the class noun's embedding ("person"), as the paper initialises from a
coarse descriptor, and the subject's prompts are rewritten: "a photo of rraj person" -> "a photo
of <rraj> person".

How only the new rows train: `NewTokenEmbedding` keeps the original table (frozen, untouched) and
holds the new rows as a separate parameter. The optimizer (and its weight decay) then sees nothing
but the new rows, so every other row stays bit-identical, and Adam's moments are a few KB instead
of a 49408-row table's.

File layout (what diffusers' `load_textual_inversion` reads): SDXL: {"clip_l": (n, 768),
"clip_g": (n, 1280)}, loaded once per encoder (`pipe.load_textual_inversion(sd["clip_l"],
token="<rraj>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`, then "clip_g" with
text_encoder_2 / tokenizer_2). SD 1.x / 2.x: {"<rraj>": (n, D)}. With n > 1 vectors the tokens are
`<rraj>`, `<rraj>_1`, ... and a prompt's `<rraj>` is expanded to all of them, as diffusers does.

One quirk, shared with diffusers since both run transformers' CLIP: SDXL's encoder configs say
eos_token_id 2, which makes transformers pool at the *highest* token id of the prompt instead of
at the end token, and an added token has the highest id. So with `<rraj>` in the prompt SDXL's
pooled embedding is `<rraj>`'s final hidden state. Training sees the same, so it learns with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minidream.files import atomic_write
from minidream.formats.loading import widen_float8
from minidream.method import Method, text_encoders, train_mode
from minidream.config import EMBEDDING_FILE, TrainingError
from minidream.errors import UserError

FILE_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL files: one tensor per encoder


class EmbeddingFileError(UserError):
    """A textual-inversion file that cannot be used with this model; the message says why."""


# ----------------------------------------------------------------------------- the embedding table

class NewTokenEmbedding(nn.Module):
    """An embedding lookup over a frozen table plus new rows kept as a separate parameter.

    Ids below `first_id` read `weight` (the original table, the same frozen Parameter, so the state
    dict keeps its name), ids first_id, first_id + 1, ... read `vectors`. Looking up and selecting
    are exact, so the output equals that of one table with the new rows appended (what diffusers
    builds with resize_token_embeddings).
    """

    def __init__(self, table: nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.weight, self.first_id = table.weight, first_id
        self.vectors = nn.Parameter(vectors, requires_grad=False)  # (n, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        old = F.embedding(ids.clamp(max=self.first_id - 1), self.weight)  # (B, L, D)
        new = F.embedding((ids - self.first_id).clamp(min=0), self.vectors).to(old.dtype)  # (B, L, D)
        return torch.where((ids >= self.first_id)[..., None], new, old)


def token_names(token: str, n: int) -> list[str]:
    """diffusers' names for an n-vector word: token, token_1, ..., token_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_token(tokenizer, encoder, token: str, vectors: torch.Tensor) -> NewTokenEmbedding:
    """Add `token` (n = len(vectors) entries) to one tokenizer and its rows to the encoder's table."""
    names = token_names(token, vectors.shape[0])
    taken = [t for t in names if t in tokenizer.get_vocab() or t + "</w>" in tokenizer.get_vocab()]
    if taken:
        raise EmbeddingFileError(f"{taken[0]!r} is already a word of the tokenizer: choose another token (e.g. "
                                 f"'<{token.strip('<>')}2>'), or load each embedding file once")
    table = encoder.get_input_embeddings()
    width = table.weight.shape[1]
    if vectors.shape[1] != width:
        raise EmbeddingFileError(f"the embedding of {token!r} is {vectors.shape[1]} wide but this text encoder's "
                                 f"tokens are {width} wide: it was trained for another model family")
    vectors = vectors.to(torch.float32).to(table.weight.device)
    if isinstance(table, NewTokenEmbedding):  # a second word: one more block of rows
        first = table.first_id + table.vectors.shape[0]
        table.vectors = nn.Parameter(torch.cat([table.vectors.detach(), vectors]), requires_grad=False)
    else:
        first = len(tokenizer)
        table = NewTokenEmbedding(table, first, vectors)
        encoder.set_input_embeddings(table)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    assert ids == list(range(first, first + len(names))), f"tokenizer gave {token!r} ids {ids}, expected from {first}"
    return table


def initial_vectors(tokenizer, encoder, word: str, n: int) -> torch.Tensor:
    """(n, D) copies of the mean embedding of `word`'s tokens: where training starts."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise EmbeddingFileError(f"the initialisation word {word!r} has no tokens; give --init-word WORD")
    rows = encoder.get_input_embeddings().weight[torch.tensor(ids)]  # (k, D)
    return rows.float().mean(dim=0, keepdim=True).repeat(n, 1).detach()


def name_the_word(text: str, subject_token: str, placeholder: str, n: int = 1) -> str:
    """The subject's DreamBooth token as the new word: "a photo of rraj person" -> "a photo of <rraj>
    person" (whole words only; an existing placeholder stays), spelled out for n vectors."""
    word = re.compile(rf"(?<![<\w]){re.escape(subject_token)}(?![>\w])")
    return expand_prompt(word.sub(placeholder, text), placeholder, n)


def expand_prompt(text: str, token: str, n: int) -> str:
    """'a photo of <rraj>' -> 'a photo of <rraj> <rraj>_1 ...' for an n-vector word (diffusers' rule)."""
    if n == 1:
        return text
    return re.sub(rf"{re.escape(token)}(?!_\d)", " ".join(token_names(token, n)), text)


# ----------------------------------------------------------------------------- files

def embedding_tensors(text, token: str) -> dict[str, torch.Tensor]:
    """The file's tensors: SDXL {"clip_l", "clip_g"}, one-encoder models {token: (n, D)}."""
    rows = {name: enc.get_input_embeddings().vectors.detach().float().cpu() for name, enc in text_encoders(text).items()}
    if text.is_sdxl:
        return {FILE_KEYS[name]: v.contiguous() for name, v in rows.items()}
    return {token: rows["text_encoder"].contiguous()}


def save_embedding(path, text, token: str, **metadata) -> Path:
    """Write the trained word's vectors (fp32; a few KB) with the token in the metadata."""
    tensors = embedding_tensors(text, token)
    info = {"format": "pt", "token": token, **{k: str(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=info))


def read_embedding(path, token: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, {"text_encoder": (n, D1), ["text_encoder_2": (n, D2)]}) from a textual-inversion file.

    Reads the SDXL layout {"clip_l", "clip_g"}, diffusers' one-encoder layout {token: tensor} and
    A1111's safetensors {"emb_params": tensor}. The token: `token` if given, else the file's
    metadata, else (A1111's convention) the file name.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise EmbeddingFileError(f"{path}: only .safetensors embeddings are read (pickle files can run code)")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            stored = (f.metadata() or {}).get("token")
    except Exception as e:  # missing, truncated, not safetensors
        raise EmbeddingFileError(f"cannot read the embedding file {path} ({type(e).__name__}: {e})") from None
    if set(tensors) == {"clip_l", "clip_g"}:
        rows = {"text_encoder": tensors["clip_l"], "text_encoder_2": tensors["clip_g"]}
    elif len(tensors) == 1:
        (key, rows_1), = tensors.items()
        stored = stored or (None if key == "emb_params" else key)
        rows = {"text_encoder": rows_1}
    else:
        raise EmbeddingFileError(f"{path} holds {sorted(tensors)[:4]}: not a textual-inversion file (expected "
                                 "'clip_l' + 'clip_g', or one tensor)")
    for name, vectors in rows.items():
        if not vectors.is_floating_point() or vectors.dim() not in (1, 2):
            raise EmbeddingFileError(f"{path}: {name}'s vectors are {vectors.dtype} {tuple(vectors.shape)}, not "
                                     "floating-point rows (n, D): the file is damaged or not an embedding")
    rows = {k: widen_float8(v[None] if v.dim() == 1 else v) for k, v in rows.items()}  # (D,) -> (1, D)
    if not all(v.isfinite().all() for v in rows.values()):
        raise EmbeddingFileError(f"{path} holds NaN or infinite values: it would draw black images; "
                                 "re-download or re-train it")
    return token or stored or path.stem, rows


def load_embedding(text, path, token: str | None = None) -> tuple[str, int]:
    """Add the word of a textual-inversion file to the model's tokenizers and text encoders (frozen).
    Returns (token, number of vectors): prompts name the word as `token` (see expand_prompt)."""
    token, rows = read_embedding(path, token)
    encoders = text_encoders(text)
    if set(rows) != set(encoders):
        kind = "SDXL (two text encoders)" if len(rows) == 2 else "a one-encoder model (SD 1.x / 2.x)"
        raise EmbeddingFileError(f"{path} was trained for {kind}, but this model has {len(encoders)} text encoder(s)")
    tokenizers = {"text_encoder": text.tokenizer, "text_encoder_2": text.tokenizer_2}
    for name, encoder in encoders.items():
        add_token(tokenizers[name], encoder, token, rows[name].to(encoder.dtype))
    return token, next(iter(rows.values())).shape[0]


# ----------------------------------------------------------------------------- the training method

class TextualInversion(Method):
    """train.py --method textual-inversion: only the new word's vectors train (both SDXL encoders)."""

    name = "textual-inversion"
    output = EMBEDDING_FILE
    sample_flag = "--embedding"

    def __init__(self, model, cfg, token, class_noun):
        super().__init__(model, cfg, token, class_noun)
        self.placeholder = cfg.placeholder_token or f"<{token}>"
        text = model.text
        tokenizers = {"text_encoder": text.tokenizer, "text_encoder_2": text.tokenizer_2}
        self.encoders = text_encoders(model.text)
        for name, encoder in self.encoders.items():
            start = initial_vectors(tokenizers[name], encoder, cfg.init_word or class_noun, cfg.num_vectors)
            add_token(tokenizers[name], encoder, self.placeholder, start).vectors.requires_grad_(True)
            train_mode(encoder, cfg.gradient_checkpointing)
        # The UNet stays frozen, but the gradient flows back through it to the prompt: checkpoint it too.
        model.unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)

    @staticmethod
    def trains_text(cfg) -> bool:
        return True

    def trained_modules(self):
        return self.encoders

    def param_groups(self):
        return [{"params": [e.get_input_embeddings().vectors for e in self.encoders.values()], "lr": self.cfg.lr}]

    def state_dict(self):
        return {name: {k: v for k, v in e.state_dict().items() if k.endswith("token_embedding.vectors")}
                for name, e in self.encoders.items()}

    def save(self, path, step):
        return save_embedding(path, self.model.text, self.placeholder, steps=step, base_model=self.model.name,
                              class_noun=self.class_noun, num_vectors=self.cfg.num_vectors)

    def prompt(self, text: str) -> str:
        return name_the_word(text, self.token, self.placeholder, self.cfg.num_vectors)

    @staticmethod
    def check_subject(cfg, subject) -> None:
        placeholder = cfg.placeholder_token or f"<{subject.token}>"
        if placeholder not in name_the_word(subject.instance_prompt, subject.token, placeholder):
            raise TrainingError(f"the instance prompt {subject.instance_prompt!r} names neither {subject.token!r} nor "
                                f"{placeholder!r}: textual inversion learns the word the prompt uses for the subject")

    def summary(self) -> str:
        widths = " + ".join(str(e.get_input_embeddings().vectors.shape[1]) for e in self.encoders.values())
        return (f"{sum(p.numel() for p in self.parameters()):,} embedding values ({self.cfg.num_vectors} x "
                f"({widths}) for {self.placeholder})")
