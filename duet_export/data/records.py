"""Read training data (LLaVA instruction JSON + image folder) and evaluation questions (JSONL).

Every malformed record is a one-line `DuetError` that names the file and the record; so is a missing image.
A conversation trains as one sequence, as in LLaVA: the image once, then every human turn and its gpt
answer, with the loss on all answers. That gives many answers per pass over the image's tokens, the costly
part. `split_turns=True` instead makes each (question, answer) pair its own example that sees the image
alone. Video records (Video-LLaVA's format) name a `video` instead (a video file or a folder of frames)
and hold `<video>`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from duet_export.errors import DuetError
from duet_export.images import check_image_file

__all__ = ["Question", "TrainingExample", "read_llava_json", "read_questions", "write_answers"]

IMAGE_PLACEHOLDER = "<image>"
PLACEHOLDERS = (IMAGE_PLACEHOLDER, "<video>")


@dataclass(frozen=True)
class TrainingExample:
    id: str
    image: Path  # an image, or a video file / folder of frames
    question: str  # without the <image> / <video> placeholder: the chat template adds it
    answer: str
    follow_ups: tuple[tuple[str, str], ...] = ()  # the conversation's later (question, answer) turns

    @property
    def turns(self) -> tuple[tuple[str, str], ...]:
        return ((self.question, self.answer), *self.follow_ups)


@dataclass(frozen=True)
class Question:
    question_id: str
    image: Path
    text: str
    answer: str | None
    kind: str | None = None  # optional question type, for per-kind accuracy
    where: str = ""  # "test.jsonl line 3", for messages about this question


def _visual_path(root: Path, rec: dict, where: str) -> Path:
    """The record's `image` (a file) or `video` (a file or a folder of frames), resolved against `root`."""
    key = "video" if "video" in rec and "image" not in rec else "image"
    name = rec.get(key)
    if not isinstance(name, str) or not name:
        raise DuetError(f"{where}: 'image' (or 'video') must be a file name")
    path = root / name
    if not (path.is_file() or (key == "video" and path.is_dir())):
        raise DuetError(f"{where}: {key} {path} does not exist")
    if key == "image":
        try:
            check_image_file(path)
        except DuetError as e:
            raise DuetError(f"{where}: {e}") from None
    return path


def _strip_placeholders(text: str) -> str:
    for token in PLACEHOLDERS:
        text = text.replace(token, "")
    return text.strip()


def read_llava_json(
    path: str | os.PathLike, image_folder: str | os.PathLike | None = None, split_turns: bool = False
) -> list[TrainingExample]:
    """LLaVA instruction JSON -> one example per conversation (`split_turns`: per turn); images resolve
    against `image_folder` (default: the JSON's folder)."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise DuetError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DuetError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DuetError(f"{path}: expected a JSON list of records")
    out = []
    for i, rec in enumerate(records):
        where = f"{path.name} record {i}" + (f" (id {rec.get('id')!r})" if isinstance(rec, dict) else "")
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise DuetError(f"{where}: needs 'id', 'image' and a 'conversations' list")
        image = _visual_path(root, rec, where)
        turns = rec["conversations"]
        if len(turns) < 2 or len(turns) % 2:
            raise DuetError(f"{where}: conversations must alternate human/gpt turns")
        pairs = []
        for t in range(0, len(turns), 2):
            human, gpt = turns[t], turns[t + 1]
            if not (isinstance(human, dict) and isinstance(gpt, dict)):
                raise DuetError(f"{where}: turn {t} is not an object")
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise DuetError(f"{where}: turn {t} must be from 'human' and turn {t + 1} from 'gpt'")
            q, a = human.get("value"), gpt.get("value")
            if not isinstance(q, str) or not isinstance(a, str) or not a.strip():
                raise DuetError(f"{where}: turn {t} needs string 'value's and a non-empty answer")
            if t == 0 and not any(token in q for token in PLACEHOLDERS):
                raise DuetError(f"{where}: the first human turn must hold {IMAGE_PLACEHOLDER} (or <video>)")
            pairs.append((_strip_placeholders(q), a.strip()))
        rid = str(rec.get("id", i))
        if split_turns:
            out.extend(TrainingExample(rid, image, q, a) for q, a in pairs)
        else:
            out.append(TrainingExample(rid, image, *pairs[0], follow_ups=tuple(pairs[1:])))
    if not out:
        raise DuetError(f"{path}: no records")
    return out


_QUESTION_FIELDS = (
    ("question_id", (str, int), "a string or an integer"),
    ("text", str, "a string"),
    ("answer", (str, type(None)), "a string"),
    ("kind", (str, type(None)), "a string"),
)


def read_questions(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[Question]:
    """JSONL `{"question_id", "image", "text", "answer"?}` -> questions (images against `image_folder`)."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    if not path.is_file():
        raise DuetError(f"{path}: no such file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DuetError(f"{where} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "question_id" not in rec or "text" not in rec:
            raise DuetError(f"{where}: needs 'question_id', 'image' and 'text'")
        for key, kinds, what in _QUESTION_FIELDS:
            if key in rec and not isinstance(rec[key], kinds):
                raise DuetError(f"{where}: {key!r} must be {what}, got {json.dumps(rec[key])[:40]}")
        text = _strip_placeholders(rec["text"])
        image = _visual_path(root, rec, where)
        out.append(Question(str(rec["question_id"]), image, text, rec.get("answer"), rec.get("kind"), where))
    if not out:
        raise DuetError(f"{path}: no questions")
    return out


def write_answers(path: str | os.PathLike, rows: list[dict]) -> None:
    """Answers as JSONL, written atomically."""
    from duet_export.outputs import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
