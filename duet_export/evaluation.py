"""Evaluate a PyTorch model or an ONNX bundle on JSONL questions: accuracy, visual tokens, answers.

Both paths answer the same questions with greedy decoding and are scored the same way, so a bundle's
accuracy can be compared with its source model's directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from duet_export.compression import compress, decompress
from duet_export.config import DuetConfig
from duet_export.data.records import Question
from duet_export.errors import DuetError
from duet_export.generate import GenerationSettings, generate_answers
from duet_export.loading import LoadedModel, load_visual
from duet_export.stages.budget import report

__all__ = ["EvalResult", "evaluate", "normalize_answer"]

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}


def normalize_answer(text: str) -> str:
    """The first word, lower-cased, without punctuation; number words become digits ("Seven." -> "7")."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    return _NUMBER_WORDS.get(words[0], words[0])


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    by_kind: dict[str, float]
    average_tokens: float
    reduction: float
    seconds: float
    answers: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(self.by_kind.items()))
        return (
            f"accuracy {100 * self.accuracy:.2f} % ({self.correct}/{self.total}"
            + (f"; {kinds}" if kinds else "")
            + f"), average visual tokens {self.average_tokens:.2f} ({100 * self.reduction:.1f} % fewer), "
            f"{self.seconds:.1f} s"
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "answers"}


def _read_for(question: Question, read: Callable):
    """The question's image or clip; a bad file's one-line error names the question's record and line."""
    try:
        return read(question.image)
    except DuetError as e:
        raise DuetError(f"{question.where or question.question_id}: {e}") from None


def evaluate(
    target,
    questions: Sequence[Question],
    config: DuetConfig | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Answer every question with `target` (a `LoadedModel` with `config`, or an `OnnxVLM` bundle)."""
    from duet_export.runtimes import OnnxVLM

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    if isinstance(target, OnnxVLM):
        budget = target.manifest["budget"]
        average, reduction = float(budget["average_tokens"]), float(budget["reduction"])
        settings = GenerationSettings(max_new_tokens=min(max_new_tokens, target.max_new_tokens))
        batch_size = target.batch

        def answer(images, texts):
            return target.generate(images, texts, settings)

        read = target.load_visual

    else:
        loaded: LoadedModel = target
        geometry = loaded.adapter.geometry()
        if config is not None and config.enabled:
            compress(loaded.model, config)
            rep = report(config, geometry)
            average, reduction = rep.average_tokens, rep.reduction
        else:
            decompress(loaded.model)
            average, reduction = float(geometry.total_patches), 0.0

        def answer(images, texts):
            return generate_answers(loaded, images, texts, settings)

        def read(path):
            return load_visual(path, loaded.adapter)

    start = time.perf_counter()
    rows, correct, per_kind = [], 0, {}
    for first in range(0, len(questions), batch_size):
        chunk = questions[first : first + batch_size]
        images = [_read_for(q, read) for q in chunk]
        for q, a in zip(chunk, answer(images, [q.text for q in chunk]), strict=True):
            row = {"question_id": q.question_id, "text": q.text, "answer": a.text}
            kind = q.kind
            if q.answer is not None:
                ok = normalize_answer(a.text) == normalize_answer(q.answer)
                correct += ok
                row.update(expected=q.answer, correct=bool(ok))
                if kind:
                    hit, total = per_kind.get(kind, (0, 0))
                    per_kind[kind] = (hit + ok, total + 1)
            rows.append(row)
        if progress:
            progress(min(first + batch_size, len(questions)), len(questions))
    scored = sum(1 for r in rows if "correct" in r)
    return EvalResult(
        accuracy=correct / scored if scored else float("nan"),
        correct=correct,
        total=scored,
        by_kind={k: h / t for k, (h, t) in per_kind.items()},
        average_tokens=average,
        reduction=reduction,
        seconds=time.perf_counter() - start,
        answers=rows,
    )
