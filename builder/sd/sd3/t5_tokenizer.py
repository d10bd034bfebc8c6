"""A small T5 tokenizer (SentencePiece unigram, T5's special tokens and ids) written offline.

Synthetic SD3 pipelines need a `tokenizer_3/` folder that diffusers loads as `T5TokenizerFast` and that
ships in the bundle as `tokenizer.json` + `tokenizer_config.json` (what the Swift package's
`PreTrainedTokenizer` reads). Real checkpoints bring their own 32k-piece tokenizer; this one keeps
T5's layout (pad 0, end-of-sequence 1, unknown 2, end-of-sequence appended) with a few hundred pieces.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_WORD_MARK = "\u2581"  # SentencePiece's word-start marker
_WORDS = (
    "a an the of and in on with at to for from by is are photo painting picture portrait landscape city street "
    "cat dog bird horse man woman child people tree forest mountain river sea sky sun moon night day light dark "
    "red green blue yellow black white orange purple golden silver old new small large beautiful detailed "
    "astronaut riding sign says hello world holding standing sitting flying style art digital oil watercolor"
).split()


def _pieces() -> list[tuple[str, float]]:
    """Pieces with log-probabilities: whole words first (most likely), then single characters alone and
    at a word's start, so any printable ASCII text tokenizes without unknowns."""
    pieces = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    pieces += [(_WORD_MARK + word, -2.0 - index / 100) for index, word in enumerate(_WORDS)]
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces += [(_WORD_MARK + c, -8.0) for c in characters]
    pieces += [(c, -9.0) for c in characters]
    pieces += [(_WORD_MARK, -10.0)]
    return pieces


def write_t5_tokenizer(folder: Path, model_max_length: int) -> int:
    """Write a T5 tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json);
    returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5Tokenizer  # the fast (tokenizers-backed) one in transformers 5

    pieces = _pieces()
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2))
    # No normalizer and transformers' own pre-tokenization: transformers 5 rebuilds T5's pipeline from the
    # vocabulary this way when it loads tokenizer.json, and the Swift package reads the file as written.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=_WORD_MARK, prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_WORD_MARK, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    fast = T5Tokenizer(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        extra_ids=0,
        model_max_length=model_max_length,
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return len(pieces)
