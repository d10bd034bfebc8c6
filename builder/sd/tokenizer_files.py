"""A CLIP-format byte-level BPE tokenizer generated on the spot.

Tests and the default build use tiny Stable Diffusion pipelines with seeded random weights, and
no model hub is reachable, so the tokenizer cannot be downloaded. This module learns a small set
of BPE merges from a built-in corpus of image-prompt English and writes `vocab.json` and
`merges.txt` laid out exactly like OpenAI CLIP's, so `transformers.CLIPTokenizer`, diffusers and
the Swift StableDiffusion package all read them as they read the real ones.

The output is a pure function of `merges`: the same bytes on every call and every machine, which
keeps build caches keyed on file hashes stable.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Prompt-like English (data/prompt_corpus.txt). Word frequencies in it decide which merges are learnt
# first, so the short function words and the stock prompt phrases come out as single tokens.
_CORPUS_FILE = Path(__file__).parent / "data" / "prompt_corpus.txt"

_PRETOKEN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""")


@dataclass(frozen=True)
class TokenizerInfo:
    """What model configs need to match the written tokenizer (CLIP pads with end-of-text)."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def _printable_bytes() -> list[int]:
    return [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


@lru_cache(maxsize=1)
def _byte_to_symbol() -> dict[int, str]:
    """The 256 printable stand-ins for raw bytes, in CLIP's `bytes_to_unicode` order.

    Printable Latin-1 bytes stand for themselves; the rest map to code points from 256 up, so
    every byte string becomes a whitespace-free string BPE can work on. The dict's order is
    CLIP's vocabulary order, not byte order.
    """
    printable = _printable_bytes()
    rest = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return mapping


def _byte_symbols() -> tuple[str, ...]:
    return tuple(_byte_to_symbol().values())


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Corpus words as symbol sequences (last symbol carries `</w>`), with their counts."""
    to_symbol = _byte_to_symbol()
    counts: Counter[tuple[str, ...]] = Counter()
    corpus = _CORPUS_FILE.read_text(encoding="utf-8")
    for word in _PRETOKEN.findall(" ".join(corpus.lower().split())):
        symbols = [to_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        counts[tuple(symbols)] += 1
    return counts


@lru_cache(maxsize=1)
def _all_merges() -> tuple[tuple[str, str], ...]:
    """Every BPE merge the corpus supports, in learning order, deterministically.

    Classic BPE: repeatedly merge the most frequent adjacent pair; ties go to the smallest pair
    in string order. A pair whose concatenation is already a token is never chosen, so every
    merge adds exactly one new vocabulary entry, as in CLIP's files. Pair counts are updated
    incrementally (only words containing the merged pair are touched); the whole run takes
    about 50 ms. Greedy training makes the first N merges of this list the N-merge result.
    """
    base = set(_byte_symbols()) | {s + END_OF_WORD for s in _byte_symbols()}
    word_counts = _corpus_words()
    words = [list(w) for w in sorted(word_counts)]
    freqs = [word_counts[tuple(w)] for w in words]

    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:], strict=False):
            pair_counts[pair] += freqs[i]
            pair_words.setdefault(pair, set()).add(i)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    tokens = set(base)
    learnt: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        new = pair[0] + pair[1]
        if new in tokens:
            del pair_counts[pair]
            continue
        tokens.add(new)
        learnt.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(pair_words.pop(pair, ())):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:], strict=False):
                pair_counts[p] -= f
                touched.add(p)
            merged: list[str] = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for p in zip(merged, merged[1:], strict=False):
                pair_counts[p] += f
                pair_words.setdefault(p, set()).add(i)
                touched.add(p)
        pair_counts.pop(pair, None)
        for p in touched:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)
    return tuple(learnt)


def _learn_merges(merges: int) -> tuple[tuple[str, str], ...]:
    learnt = _all_merges()
    if not 0 <= merges <= len(learnt):
        raise ValueError(
            f"merges must be between 0 and {len(learnt)} (what the built-in corpus supports), got {merges}"
        )
    return learnt[:merges]


def _vocab(merges: int) -> dict[str, int]:
    symbols = list(_byte_symbols())
    entries = symbols + [s + END_OF_WORD for s in symbols]
    entries += [a + b for a, b in _learn_merges(merges)]
    entries += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(entries)}


def _info(vocab_size: int) -> TokenizerInfo:
    return TokenizerInfo(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def clip_vocab_size(merges: int = 2000) -> int:
    """Vocabulary size of the tokenizer `write_clip_tokenizer(merges=...)` writes.

    512 byte symbols + one token per merge + 2 special tokens; raises ValueError when the corpus
    cannot supply that many merges, so a config never promises a size the files do not have.
    """
    _learn_merges(merges)
    return 2 * 256 + merges + 2


def clip_tokenizer_info(merges: int = 2000) -> TokenizerInfo:
    """Token ids for model configs, without writing files."""
    return _info(clip_vocab_size(merges))


def write_clip_tokenizer(folder: Path, *, merges: int = 2000) -> TokenizerInfo:
    """Write CLIP-format `vocab.json` and `merges.txt` into `folder` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(merges)
    (folder / "vocab.json").write_bytes(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in _learn_merges(merges))]
    (folder / "merges.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return _info(len(vocab))


def write_tokenizer_folder(folder: Path, *, merges: int = 2000, pad_token: str = EOS_TOKEN) -> TokenizerInfo:
    """Write a complete diffusers `tokenizer/` folder that `CLIPTokenizer.from_pretrained` loads offline.

    Adds `tokenizer_config.json` (class name, special tokens, 77-token context) and
    `special_tokens_map.json` next to the vocabulary files, as the hub's SD checkpoints have.
    `pad_token` is end-of-text for CLIP, "!" for SDXL's second tokenizer (OpenCLIP pads with it).
    """
    folder = Path(folder)
    info = write_clip_tokenizer(folder, merges=merges)
    _write_tokenizer_configs(folder, pad_token)
    return info


def _write_tokenizer_configs(folder: Path, pad_token: str) -> None:
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": pad_token,
        "unk_token": EOS_TOKEN,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **special,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        (folder / name).write_bytes(text.encode("utf-8"))


# OpenAI CLIP's own merges (builder/sd/data/README.md): the vocabulary real checkpoints were trained with.
_CLIP_MERGES = Path(__file__).parent / "data" / "clip_merges.txt.gz"
CLIP_VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    import gzip

    lines = gzip.decompress(_CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()
    return tuple(tuple(line.split(" ")) for line in lines[1:])  # type: ignore[misc]


def write_openai_clip_tokenizer_folder(folder: Path, *, pad_token: str = EOS_TOKEN) -> TokenizerInfo:
    """Write the real CLIP tokenizer (the one SD 1.x, 2.x and SDXL checkpoints were trained with) as a
    diffusers tokenizer folder: its vocabulary is the byte symbols, the same with `</w>`, one token per
    merge and the two special tokens, in that order, as CLIP builds it from its merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges()
    symbols = list(_byte_symbols())
    entries = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(entries)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{_CLIP_MERGES} gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}")
    (folder / "vocab.json").write_bytes(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    _write_tokenizer_configs(folder, pad_token)
    return TokenizerInfo(
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )
