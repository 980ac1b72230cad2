"""Word-level vocabularies and tokenizers for the tiny checkpoints (no tokenizer may be downloaded)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from duet_export.stages.salient import QUESTION_WORDS, STOP_WORDS

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer", "padded", "tiny_vocabulary", "word_level"]


SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

_WORDS = [
    "user",
    "assistant",
    "image",
    "picture",
    "photo",
    "grid",
    "cell",
    "cells",
    "row",
    "rows",
    "column",
    "columns",
    "digit",
    "digits",
    "number",
    "numbers",
    "frame",
    "frames",
    "clip",
    "video",
    "many",
    "count",
    "counted",
    "appear",
    "appears",
    "appearing",
    "shown",
    "show",
    "shows",
    "visible",
    "see",
    "seen",
    "there",
    "yes",
    "no",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "describe",
    "color",
    "colour",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "gray",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "corner",
    "upper",
    "lower",
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "last",
    "next",
    "image's",
    "answer",
    "word",
    "single",
    "phrase",
    "question",
    "please",
    "tell",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "sky",
    "square",
    "circle",
    "shape",
    "bright",
    "dark",
    "large",
    "small",
    "big",
    "little",
    "read",
]


def padded(words: list[str], size: int | None) -> list[str]:
    """`words`, then filler words up to `size` entries (real checkpoints' vocabularies are that wide)."""
    if size is None or size <= len(words):
        return words
    return words + [f"filler{i:05d}" for i in range(size - len(words))]


def tiny_vocabulary() -> list[str]:
    """Special tokens, punctuation, digits, the stop words and the words of the demo and GridDigits prompts."""
    words: list[str] = list(SPECIAL_TOKENS)
    pieces = [*list("?!:.,;'\"()-"), *[str(i) for i in range(100)]]
    pieces += sorted(STOP_WORDS | QUESTION_WORDS)
    pieces += _WORDS
    for w in pieces:
        if w not in words:
            words.append(w)
    return words


def word_level(vocab: dict[str, int], unk: str) -> Tokenizer:
    """Lower-casing, whitespace- and punctuation-split word-level model over `vocab`."""
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return tok


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level fast tokenizer with `<image>` (and `<video>`, if listed) as special tokens."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = word_level(vocab, "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image>",
            **({"video_token": "<video>"} if "<video>" in vocab else {}),
        },
        padding_side="left",
        model_max_length=2048,
    )
    return fast
