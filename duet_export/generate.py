"""Answer prompts about images with a (possibly compressed) PyTorch model: `generate_answers`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

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
    on_note: Callable[[str], None] | None = None,
) -> list[Answer]:
    """Generate one answer per (image, prompt), batched, with the model's current compression (if any).

    A prompt that runs past the decoder's `max_position_embeddings` is answered with a note (`on_note`,
    default: a warning): the model was never trained on such positions."""
    text = loaded.adapter.text_config
    settings = (settings or GenerationSettings()).validate(vocab_size=text.vocab_size)
    config = duet_config_of(loaded.model)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images, prompts, config, raw=raw)
    longest = int(inputs["attention_mask"].sum(-1).max()) + settings.max_new_tokens
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        (on_note or warnings.warn)(
            f"prompt + new tokens reach {longest} positions, past the model's max_position_embeddings "
            f"({limit}): answers may degrade"
        )
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
