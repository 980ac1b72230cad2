"""Prompts as token ids, without torch: chat template, image placeholder runs, salient-query mask.

Shared by the PyTorch path (`duet_export.inputs.prepare_inputs`) and the onnxruntime runtime, which must
import without torch so that a deployment needs only onnxruntime, transformers' tokenizers and Pillow.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from duet_export.errors import DuetError
from duet_export.stages.salient import salient_spans, token_mask_from_spans

__all__ = ["EncodedPrompts", "encode_follow_up", "encode_prompts", "image_pixels", "render_prompt"]


MEDIA = ("image", "video")


def _placeholder(processor, media: str) -> str:
    if media == "video":
        return getattr(processor, "video_token", None) or "<video>"
    return getattr(processor, "image_token", None) or "<image>"


def render_prompt(
    processor, prompt: str, num_images: int = 1, raw: bool = False, media: str = "image"
) -> tuple[str, int | None]:
    """The full prompt text and where the user's question starts in it (None if unknown).

    With `raw=False` the checkpoint's chat template wraps the question and adds the image (or video)
    placeholder; with `raw=True` (or a checkpoint without a template) `prompt` is used as written and must
    hold one placeholder per image or clip.
    """
    token = _placeholder(processor, media)
    template = getattr(processor, "chat_template", None)
    if raw or not template:
        count = prompt.count(token)
        if count != num_images:
            why = "" if raw else " (the checkpoint has no chat template: write the whole prompt)"
            raise DuetError(
                f"the prompt holds {count} {token} placeholder(s) for {num_images} {media}(s){why}"
            )
        return prompt, 0
    if token in prompt:
        raise DuetError(
            f"the prompt already holds {token}; the chat template adds it (use --raw for a full prompt)"
        )
    conversation = [
        {"role": "user", "content": [*([{"type": media}] * num_images), {"type": "text", "text": prompt}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    start = text.rfind(prompt)
    return text, (start if start >= 0 else None)


def _render_follow_up(
    processor, history: Sequence[tuple[str, str]], question: str, media: str
) -> tuple[str, int | None]:
    """The text that the chat template puts after the last answer of `history` (the (question, answer) turns
    so far, the first one with the image) for one more user turn, up to the generation prompt; and where
    the question starts in it. The answer itself and the end-of-sequence token after it are not part of it:
    the caller writes those as answer tokens."""
    if not getattr(processor, "chat_template", None):
        raise DuetError(
            "a conversation of several turns needs the checkpoint's chat template (or train with --split-turns)"
        )
    messages = []
    for i, (q, a) in enumerate(history):
        content = [*([{"type": media}] if i == 0 else []), {"type": "text", "text": q}]
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": a}]},
        ]
    before = processor.apply_chat_template(messages, tokenize=False)
    turn = {"role": "user", "content": [{"type": "text", "text": question}]}
    after = processor.apply_chat_template([*messages, turn], add_generation_prompt=True, tokenize=False)
    answer_at = before.rfind(history[-1][1])
    if not after.startswith(before) or answer_at < 0:
        raise DuetError(
            "the checkpoint's chat template does not render a conversation turn by turn: train with --split-turns"
        )
    tail = before[answer_at + len(history[-1][1]) :]  # e.g. " </s>" (LLaVA) or "<|im_end|>\n" (Qwen)
    eos = processor.tokenizer.eos_token
    if eos and eos in tail:
        tail = tail[tail.index(eos) + len(eos) :]
    text = tail + after[len(before) :]
    start = text.rfind(question)
    return text, (start if start >= 0 else None)


def encode_follow_up(
    processor, history: Sequence[tuple[str, str]], question: str, media: str = "image"
) -> tuple[list[int], list[bool]]:
    """Token ids of one more user turn after `history` (see `_render_follow_up`) and its salient-query mask:
    a conversation is the first turn's prompt (`encode_prompts`), then answer, follow-up, answer, ..."""
    text, start = _render_follow_up(processor, history, question, media)
    tok = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [] if start is None else [(a + start, b + start) for a, b in salient_spans(question)]
    return list(tok["input_ids"]), token_mask_from_spans(tok["offset_mapping"], spans)


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in `ids`."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _resize_runs(values: list, runs: list[tuple[int, int]], lengths: list[int], fill) -> list:
    """Rewrite each run (start, length) of `values` to the given new length, filled with `fill`."""
    out, cursor = [], 0
    for (start, length), new in zip(runs, lengths, strict=True):
        out.extend(values[cursor:start])
        out.extend([fill] * new)
        cursor = start + length
    out.extend(values[cursor:])
    return out


def _query_mask(processor, text: str, question_start: int | None, prompt: str, ids: list[int], image_id: int):
    """Salient-token mask aligned to `ids` (placeholders expanded), or None if the tokenizer disagrees."""
    tok = processor.tokenizer(text, return_offsets_mapping=True)
    spans = (
        []
        if question_start is None
        else [(a + question_start, b + question_start) for a, b in salient_spans(prompt)]
    )
    mask = token_mask_from_spans(tok["offset_mapping"], spans)
    runs = _runs(ids, image_id)
    collapsed = _resize_runs(ids, runs, [1] * len(runs), image_id)
    if collapsed != list(tok["input_ids"]):
        return None
    short_runs = _runs(list(tok["input_ids"]), image_id)
    return _resize_runs(mask, short_runs, [length for _, length in runs], False)


def _expand(ids: list[int], token: int, count: int) -> list[int]:
    """One placeholder per clip -> a run of `count` (resized to the real length by the caller)."""
    return [t for i in ids for t in ([i] * count if i == token else [i])]


def image_pixels(image_processor, frames: Sequence[Image.Image]) -> np.ndarray:
    """[F, 3, H, W]: the checkpoint's image processor on every image or frame (what a video processor does),
    whichever key the processor returns them under."""
    out = image_processor(list(frames), return_tensors="np")
    values = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
    return np.asarray(values, dtype=np.float32)


@dataclass
class EncodedPrompts:
    """Left-padded numpy arrays for a batch of prompts (shared by the PyTorch and onnxruntime paths)."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64
    pixel_values: np.ndarray  # [n_images, 3, H, W] float32
    query_mask: np.ndarray | None  # [B, T] bool, None if the tokenizer's offsets could not be aligned
    lengths: list[int]  # real tokens per prompt


def encode_prompts(
    processor,
    image_token_id: int,
    images: Sequence[Image.Image | Sequence[Image.Image]],
    prompts: Sequence[str],
    tokens_per_image: int | None,
    *,
    raw: bool = False,
    width: int | None = None,
    media: str = "image",
    frames: int = 1,
) -> EncodedPrompts:
    """Render, tokenise and left-pad prompts; `tokens_per_image` resizes each placeholder run (None: keep N).

    `width` pads every row to a fixed length (static-shape bundles); a longer prompt is an error. With
    `media="video"` each entry of `images` is one clip of exactly `frames` images; its frames come out as
    consecutive rows of `pixel_values` and its placeholder run holds `frames` times the per-frame tokens.
    """
    if len(images) != len(prompts):
        raise DuetError(f"{len(images)} {media}s for {len(prompts)} prompts")
    rows, masks, pixels = [], [], []
    aligned = True
    for image, prompt in zip(images, prompts, strict=True):
        group = [image] if isinstance(image, Image.Image) else list(image)  # images, or a clip's frames
        if media == "video":
            if len(group) != frames:
                raise DuetError(f"the clip has {len(group)} frames; the model takes {frames}")
            if tokens_per_image is None:
                raise ValueError("a clip needs tokens_per_image (placeholders per frame)")
            text, start = render_prompt(processor, prompt, num_images=1, raw=raw, media=media)
            ids = _expand([int(x) for x in processor.tokenizer(text)["input_ids"]], image_token_id, frames)
            pixels.append(image_pixels(processor.image_processor, group))
        else:
            text, start = render_prompt(processor, prompt, num_images=len(group), raw=raw)
            enc = processor(images=group, text=text, return_tensors="np")
            ids = [int(x) for x in enc["input_ids"][0]]
            pixels.append(np.asarray(enc["pixel_values"], dtype=np.float32))
        qmask = _query_mask(processor, text, start, prompt if not raw else text, ids, image_token_id)
        aligned &= qmask is not None
        qmask = qmask or [False] * len(ids)
        runs = _runs(ids, image_token_id)
        if tokens_per_image is not None:
            lengths = [tokens_per_image * (frames if media == "video" else 1)] * len(runs)
            ids = _resize_runs(ids, runs, lengths, image_token_id)
            qmask = _resize_runs(qmask, runs, lengths, False)
        rows.append(ids)
        masks.append(qmask)
    if not aligned:
        warnings.warn(
            "the tokenizer's offsets do not match the processor's ids: no salient-query mask", stacklevel=2
        )
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = processor.tokenizer.eos_token_id or 0
    longest = max(len(r) for r in rows)
    if width is None:
        width = longest
    elif longest > width:
        i = max(range(len(rows)), key=lambda r: len(rows[r]))
        image_tokens = sum(1 for t in rows[i] if t == image_token_id)
        raise DuetError(
            f"the prompt takes {longest - image_tokens} text tokens; the bundle holds at most "
            f"{width - image_tokens} (export again with a larger --max-prompt)"
        )
    input_ids = np.full((len(rows), width), pad, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    query = np.zeros((len(rows), width), dtype=bool)
    for i, (ids, qm) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, width - len(ids) :] = ids
        attention[i, width - len(ids) :] = 1
        query[i, width - len(ids) :] = qm
    return EncodedPrompts(
        input_ids=input_ids,
        attention_mask=attention,
        pixel_values=np.concatenate(pixels),
        query_mask=query if aligned else None,
        lengths=[len(r) for r in rows],
    )
