"""Answer prompts about images with a (possibly compressed) PyTorch model: `generate_answers`."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from PIL import Image

from duet_export.answers import Answer, GenerationSettings, decode_answer
from duet_export.compression import duet_config_of
from duet_export.inputs import prepare_inputs
from duet_export.loading import LoadedModel

__all__ = ["Answer", "GenerationSettings", "decode_answer", "generate_answers"]


def generate_answers(
    loaded: LoadedModel,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    raw: bool = False,
) -> list[Answer]:
    """Generate one answer per (image, prompt), batched, with the model's current compression (if any)."""
    settings = settings or GenerationSettings()
    config = duet_config_of(loaded.model)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images, prompts, config, raw=raw)
    device = next(loaded.model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k or None, top_p=settings.top_p)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
    tok = loaded.tokenizer
    start = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(**inputs, pad_token_id=tok.pad_token_id, **kwargs)
    seconds = time.perf_counter() - start
    width = inputs["input_ids"].shape[1]
    answers = []
    for row, mask in zip(out, inputs["attention_mask"], strict=True):
        text, new = decode_answer(tok, row[width:].tolist())
        answers.append(Answer(text=text, token_ids=new, prompt_tokens=int(mask.sum()), seconds=seconds))
    return answers
