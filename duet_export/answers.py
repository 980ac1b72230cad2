"""What a generation is asked and what it gives back, shared by PyTorch and onnxruntime (no torch here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
