"""A small CLIP tokenizer vocabulary, learned from a word list and written in the layout real repos ship.

CLIP reads text with byte-level byte-pair encoding (BPE; Sennrich et al. 2016, "Neural Machine
Translation of Rare Words with Subword Units", sec. 3.2, applied to bytes as in GPT-2). Its vocabulary
is: one symbol per byte, the same symbols marked as word ends ("</w>"), one token per learned merge,
and the two special tokens. The real one has 49408 entries; the tiny model bundled with minidream
(tiny.py) gets one learned from a few dozen prompt words, so that those words are single tokens
while any other text still tokenizes (it falls back to smaller pieces and, at worst, single bytes).

On disk (as in stabilityai/stable-diffusion-xl-base-1.0, written by transformers 4), a tokenizer
folder holds `vocab.json` + `merges.txt` + `tokenizer_config.json` + `special_tokens_map.json`
and no `tokenizer.json`; transformers' `CLIPTokenizer.from_pretrained` reads it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


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
        words = [_merge(w, best) for w in words]


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    """`word` with every adjacent occurrence of `pair` joined into one symbol, left to right."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_clip_tokenizer(folder, words, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write a CLIP BPE tokenizer learned from `words` in the real layout; returns the folder.

    Vocabulary order follows CLIP's: 256 byte symbols, the same with "</w>", one entry per merge,
    then <|startoftext|> and <|endoftext|> last, so EOS has the highest id (CLIP's legacy pooling
    takes the argmax of the ids to find it). SDXL's tokenizer pads with EOS, tokenizer_2 with "!".
    The files depend only on the arguments (same words, same bytes).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge produced a duplicate token"
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": _special(BOS), "eos_token": _special(EOS), "unk_token": _special(EOS),
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(_dump(special), encoding="utf-8")
    added = {k: {"__type": "AddedToken", **v} for k, v in special.items() if isinstance(v, dict)}
    config = {
        "add_prefix_space": False, **added, "do_lower_case": True, "errors": "replace",
        "model_max_length": model_max_length, "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(_dump(config), encoding="utf-8")
    return folder


def vocab_size(words) -> int:
    """Number of entries write_clip_tokenizer(words=words) puts in vocab.json."""
    return 2 * 256 + len(learn_merges(words)) + 2
