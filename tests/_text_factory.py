"""Tiny CLIP tokenizers and text encoders written in the on-disk layout real SDXL repos ship.

Real repos (written by transformers 4) hold, per tokenizer folder, `vocab.json` + `merges.txt` +
`tokenizer_config.json` + `special_tokens_map.json` (no `tokenizer.json`), and per text-encoder
folder `config.json` + `model.safetensors` whose CLIP-L keys start with `text_model.` and which
still carry the int64 `text_model.embeddings.position_ids` buffer. Today's `save_pretrained` writes
neither of those, so tests that only round-trip it would miss what real checkpoints look like.

Used by tests/test_text.py and by the script that builds the bundled tiny model (weights/tiny-sdxl).
"""

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that become single tokens; anything else falls back to smaller BPE pieces / single bytes.
PROMPT_WORDS = (
    "a an the of in on at with and or by for to from is photo photograph picture painting drawing "
    "portrait person man woman dog cat beach sunglasses rraj sks style high quality detailed blurry "
    "low ugly bad close up city forest mountain sky sunset red blue green black white yellow wearing "
    "hat shirt smiling standing sitting oil watercolor sketch cartoon realistic"
).split()


def byte_symbols() -> dict[int, str]:
    """The printable stand-in byte-level BPE uses for each byte 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    mapped to the unused code points 256, 257, ... so that every byte has a visible character.
    CLIP's vocabulary starts with these symbols in this order (printable ones first: "!" is id 0).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges learned on `words` until each word is a single symbol (Sennrich et al. 2016).

    Each round merges the most frequent adjacent pair (ties: alphabetical), so encoding a training
    word with these merges in rank order reproduces it as one token. The last symbol of a word
    carries CLIP's end-of-word marker "</w>".
    """
    symbol = byte_symbols()
    words = [[symbol[b] for b in w.lower().encode("utf-8")] for w in dict.fromkeys(words)]
    words = [w[:-1] + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i, w in enumerate(words):
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder, words=PROMPT_WORDS, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write a tiny CLIP BPE tokenizer in the real layout; returns the folder.

    Vocabulary order follows CLIP's: 256 byte symbols, the same with "</w>", one entry per merge,
    then <|startoftext|> and <|endoftext|> last, so EOS has the highest id (CLIP's legacy pooling
    takes the argmax of the ids to find it). SDXL's tokenizer pads with EOS, tokenizer_2 with "!".
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge produced a duplicate token"
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": _special(BOS), "eos_token": _special(EOS), "unk_token": _special(EOS),
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    added = {k: {"__type": "AddedToken", **v} for k, v in special.items() if isinstance(v, dict)}
    config = {
        "add_prefix_space": False, **added, "do_lower_case": True, "errors": "replace",
        "model_max_length": model_max_length, "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def vocab_size(words=PROMPT_WORDS) -> int:
    """Number of entries write_clip_tokenizer(words=words) puts in vocab.json."""
    return 2 * 256 + len(learn_merges(words)) + 2


# Tiny stand-ins for CLIP ViT-L/14 and OpenCLIP ViT-bigG. Head size is 64 as in the real encoders,
# so that minidream can infer the head count of a single-file copy from tensor shapes alone.
def tiny_clip_config(hidden_size: int, layers: int, hidden_act: str, vocab: int) -> dict:
    """config.json of a tiny CLIP text encoder, with the keys real SDXL text encoders have."""
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": hidden_act, "hidden_size": hidden_size, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 2 * hidden_size, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": hidden_size // 64,
        "num_hidden_layers": layers, "pad_token_id": 1, "projection_dim": hidden_size, "torch_dtype": "float32",
        "vocab_size": vocab,
    }


def random_text_encoder_state_dict(config: dict, projection: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for a CLIPTextModel(WithProjection), named as transformers 4 saves them."""
    g = torch.Generator().manual_seed(seed)
    h, f, n = config["hidden_size"], config["intermediate_size"], config["max_position_embeddings"]

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix):  # LayerNorms away from (1, 0) so that a missed one shows up
        return {f"{prefix}.weight": 1 + rnd(h, std=0.1), f"{prefix}.bias": rnd(h, std=0.1)}

    sd = {
        "text_model.embeddings.token_embedding.weight": rnd(config["vocab_size"], h),
        "text_model.embeddings.position_embedding.weight": rnd(n, h, std=0.01),
        "text_model.embeddings.position_ids": torch.arange(n).expand(1, -1).contiguous(),
        **norm("text_model.final_layer_norm"),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}.self_attn.{proj}.weight"] = rnd(h, h, std=h**-0.5)
            sd[f"{p}.self_attn.{proj}.bias"] = rnd(h)
        sd |= norm(f"{p}.layer_norm1") | norm(f"{p}.layer_norm2")
        sd |= {f"{p}.mlp.fc1.weight": rnd(f, h, std=h**-0.5), f"{p}.mlp.fc1.bias": rnd(f),
               f"{p}.mlp.fc2.weight": rnd(h, f, std=f**-0.5), f"{p}.mlp.fc2.bias": rnd(h)}
    if projection:
        sd["text_projection.weight"] = rnd(config["projection_dim"], h, std=h**-0.5)
    return sd


def write_text_encoder(folder, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write config.json + model.safetensors as in a real SDXL repo's text_encoder*/ folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_tiny_sdxl_text_parts(root, seed: int = 0, hidden=(64, 128), layers=(2, 2), words=PROMPT_WORDS) -> Path:
    """tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/ of a tiny SDXL in the diffusers layout.

    Encoder 1 plays CLIP-L (quick_gelu, no projection), encoder 2 plays OpenCLIP bigG (gelu, with
    text_projection). The UNet built on top needs cross_attention_dim = hidden[0] + hidden[1] and
    a pooled text size of hidden[1] (projection_dim).
    """
    root = Path(root)
    write_clip_tokenizer(root / "tokenizer", words)
    write_clip_tokenizer(root / "tokenizer_2", words, pad_token="!")
    vocab = vocab_size(words)
    cfg1 = tiny_clip_config(hidden[0], layers[0], "quick_gelu", vocab)
    cfg2 = tiny_clip_config(hidden[1], layers[1], "gelu", vocab) | {"architectures": ["CLIPTextModelWithProjection"]}
    write_text_encoder(root / "text_encoder", cfg1, random_text_encoder_state_dict(cfg1, False, seed))
    write_text_encoder(root / "text_encoder_2", cfg2, random_text_encoder_state_dict(cfg2, True, seed + 1))
    write_model_index(root, "StableDiffusionXLPipeline", ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"))
    return root


def write_model_index(root, pipeline: str, parts) -> Path:
    """model_index.json: what makes a folder a diffusers model folder."""
    classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "text_encoder": "CLIPTextModel",
               "text_encoder_2": "CLIPTextModelWithProjection"}
    index = {"_class_name": pipeline} | {p: ["transformers", classes[p]] for p in parts}
    (Path(root) / "model_index.json").write_text(json.dumps(index, indent=2))
    return Path(root)
