"""Build model inputs for compressed inference: chat template, image placeholders, salient-query mask.

The checkpoint's own processor produces the pixels and token ids (so a real checkpoint gets exactly what
it expects); this module then shrinks each image's placeholder run to Stage 1's output length and marks the
tokens of the question's salient words, found through the tokenizer's character offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from duet_export.config import DuetConfig
from duet_export.models.base import Adapter
from duet_export.prompts import EncodedPrompts, encode_prompts, render_prompt

__all__ = ["EncodedPrompts", "encode_prompts", "placeholders_per_image", "prepare_inputs", "render_prompt"]


def placeholders_per_image(adapter: Adapter, config: DuetConfig | None) -> int | None:
    """Placeholder tokens per image or frame: Stage 1's output, else as the processor writes them (None:
    leave an image's run as it is; a clip's run is always written here, since no processor expands it)."""
    if adapter.media == "video" or (config is not None and config.stage1):
        return adapter.tokens_per_image(config)
    return None


def prepare_inputs(
    processor,
    adapter: Adapter,
    images: Sequence[Image.Image | Sequence[Image.Image]],
    prompts: Sequence[str],
    config: DuetConfig | None = None,
    *,
    raw: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors for `model(**inputs)` / `model.generate(**inputs)`, left-padded, one entry per prompt.

    With Stage 1 on, each image holds K_d + K_c placeholder tokens instead of N. `duet_query_mask` (given
    whenever a config is) marks the salient words of each question; Stage 2 adds the final prompt token.
    """
    batch = encode_prompts(
        processor, adapter.image_token_id, images, prompts, placeholders_per_image(adapter, config), raw=raw,
        media=adapter.media, frames=adapter.frames,
    )  # fmt: skip
    out = {
        "input_ids": torch.from_numpy(batch.input_ids),
        "attention_mask": torch.from_numpy(batch.attention_mask),
        **adapter.pixel_inputs(torch.from_numpy(batch.pixel_values)),
    }
    out.update(adapter.prompt_inputs(out["input_ids"]))
    if batch.query_mask is not None and config is not None:
        out["duet_query_mask"] = torch.from_numpy(batch.query_mask)
    return out
