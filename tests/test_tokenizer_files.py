"""The generated CLIP tokenizer loads in transformers like a real one and is byte-for-byte reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from transformers import CLIPTokenizer

from builder.sd.tokenizer_files import (
    BOS_TOKEN,
    EOS_TOKEN,
    TokenizerInfo,
    clip_tokenizer_info,
    clip_vocab_size,
    write_clip_tokenizer,
    write_tokenizer_folder,
)

PROMPT = "a photo of an astronaut riding a horse on mars"
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> tuple[Path, TokenizerInfo]:
    folder = tmp_path_factory.mktemp("sd") / "tokenizer"
    return folder, write_tokenizer_folder(folder)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> CLIPTokenizer:
    folder, _ = tokenizer_dir
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _load_from_files(folder: Path) -> CLIPTokenizer:
    # transformers 5's CLIPTokenizer ignores vocab_file=/merges_file= in its constructor (it
    # builds a 3-token placeholder vocab); the files go in through vocab= / merges=.
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def test_vocab_layout_matches_clip(tokenizer_dir):
    folder, info = tokenizer_dir
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert all(len(m) == 2 for m in merges)

    tokens = sorted(vocab, key=vocab.get)
    assert list(vocab.values()) == list(range(len(vocab)))
    assert tokens[:3] == ["!", '"', "#"]  # bytes_to_unicode order, not byte order
    assert tokens[256:512] == [t + "</w>" for t in tokens[:256]]
    assert tokens[512:-2] == [a + b for a, b in merges]
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]

    assert len(merges) == 2000
    assert info == TokenizerInfo(vocab_size=2514, bos_token_id=2512, eos_token_id=2513, pad_token_id=2513)
    assert len(vocab) == info.vocab_size == clip_vocab_size() == clip_tokenizer_info().vocab_size


@pytest.mark.parametrize("merges", [0, 10, 500])
def test_vocab_size_follows_merges(tmp_path, merges):
    info = write_clip_tokenizer(tmp_path, merges=merges)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert info.vocab_size == len(vocab) == clip_vocab_size(merges) == 512 + merges + 2
    assert not (tmp_path / "tokenizer_config.json").exists()


def test_too_many_merges_is_an_error():
    for merges in (-1, 100_000):
        with pytest.raises(ValueError, match="built-in corpus"):
            clip_vocab_size(merges)


def test_prompt_pads_to_77_with_bos_and_eos(tokenizer, tokenizer_dir):
    _, info = tokenizer_dir
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        info.bos_token_id,
        info.eos_token_id,
        info.pad_token_id,
    )
    assert len(tokenizer) == info.vocab_size
    assert tokenizer.model_max_length == 77
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == info.bos_token_id
    assert info.eos_token_id in ids
    assert ids[-1] == info.pad_token_id
    assert max(ids) < info.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_truncates_long_prompts_to_77(tokenizer, tokenizer_dir):
    _, info = tokenizer_dir
    ids = tokenizer(PROMPT * 20, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert (ids[0], ids[-1]) == (info.bos_token_id, info.eos_token_id)


@pytest.mark.parametrize("word", ["a", "photo", "of", "astronaut", "riding", "horse", "cat", "painting", "the"])
def test_common_words_are_single_tokens(tokenizer, word):
    assert tokenizer.tokenize(word) == [word + "</w>"]


@pytest.mark.parametrize("text", ["xylophonist quokkas", "zqjv brrr", "naïve café 😀"])
def test_unseen_text_falls_back_to_bytes_and_round_trips(tokenizer, tokenizer_dir, text):
    _, info = tokenizer_dir
    ids = tokenizer(text).input_ids
    assert info.eos_token_id not in ids[1:-1]  # nothing became <unk>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_uppercase_is_lowered(tokenizer):
    assert tokenizer("A Photo OF Mars").input_ids == tokenizer("a photo of mars").input_ids


def test_loading_from_the_two_files_matches_from_pretrained(tokenizer, tokenizer_dir):
    folder, _ = tokenizer_dir
    direct = _load_from_files(folder)
    assert direct(PROMPT).input_ids == tokenizer(PROMPT).input_ids


def test_fast_alias_is_the_same_class(tokenizer_dir):
    # transformers 5 has a single tokenizers-backed CLIPTokenizer; the old Fast name is an alias.
    folder, _ = tokenizer_dir
    fast = getattr(transformers, "CLIPTokenizerFast", CLIPTokenizer)
    assert fast is CLIPTokenizer
    auto = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert type(auto) is CLIPTokenizer
    assert auto(PROMPT).input_ids == CLIPTokenizer.from_pretrained(folder)(PROMPT).input_ids


def test_output_is_byte_identical(tmp_path):
    write_tokenizer_folder(tmp_path / "one")
    write_tokenizer_folder(tmp_path / "two")
    for name in FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
