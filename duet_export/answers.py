"""What a generation is asked and what it gives back, shared by PyTorch and onnxruntime (no torch here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from duet_export.errors import DuetError

__all__ = ["Answer", "GenerationSettings", "decode_answer"]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by the PyTorch and onnxruntime generators."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, *, most_new_tokens: int | None = None, vocab_size: int | None = None):
        """These settings, or a one-line `DuetError` saying what is wrong (the same checks for PyTorch and
        onnxruntime; `most_new_tokens`: a bundle's cache room, `vocab_size`: the logits' width)."""
        n = self.max_new_tokens
        if not isinstance(n, int) or n < 1:
            raise DuetError(f"--max-new-tokens must be at least 1, got {n}")
        if most_new_tokens is not None and n > most_new_tokens:
            raise DuetError(
                f"--max-new-tokens {n}: the bundle was exported for at most {most_new_tokens} "
                "(export again with a larger --max-new-tokens)"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise DuetError(f"--temperature must be a positive number, got {self.temperature}")
        if self.do_sample and self.temperature == 0:
            raise DuetError("--temperature 0 means greedy decoding: leave out --sample instead")
        if self.top_k < 0:
            raise DuetError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if vocab_size is not None and self.top_k > vocab_size:
            raise DuetError(f"--top-k {self.top_k} exceeds the vocabulary's {vocab_size} tokens")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise DuetError(f"--top-p must lie in (0, 1], got {self.top_p}")
        return self


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float


def decode_answer(tokenizer, new_ids: Sequence[int]) -> tuple[str, list[int]]:
    """The answer's text and ids: cut at the first EOS, padding removed (shared with the ONNX runtime)."""
    new = [int(t) for t in new_ids]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    new = [t for t in new if t != tokenizer.pad_token_id]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new
