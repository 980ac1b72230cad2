"""`inspect`: which patches each stage kept for one image and prompt, as JSON and as a picture."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from duet_export.config import DuetConfig
from duet_export.forward import DuetForward, DuetTrace
from duet_export.inputs import prepare_inputs
from duet_export.loading import LoadedModel
from duet_export.stages.budget import report
from duet_export.stages.t2v import select_queries

__all__ = ["inspect_prompt", "model_view"]


def _stage1_json(trace: DuetTrace) -> dict[str, Any] | None:
    s1 = trace.stage1
    if s1 is None:
        return None
    anchors = s1.anchors[0].tolist()
    members: list[list[int]] = [[] for _ in anchors]
    for patch, slot in zip(s1.members[0].tolist(), s1.assignment[0].tolist(), strict=True):
        members[slot].append(patch)
    return {
        "order": "CLS, dominant patches in position order, contextual tokens in anchor order",
        "cls": True,
        "dominant": s1.dominant[0].tolist(),
        "contextual": [{"anchor": a, "members": sorted(m)} for a, m in zip(anchors, members, strict=True)],
        "tokens": 1 + s1.dominant.shape[1] + len(anchors),
    }


def _describe_token(index: int, stage1: dict[str, Any] | None) -> str:
    """Name a Stage-1 output token: 'cls', 'patch:<i>' or 'context:<anchor>'."""
    if stage1 is None:
        return f"patch:{index}"
    if index == 0:
        return "cls"
    dominant = stage1["dominant"]
    if index <= len(dominant):
        return f"patch:{dominant[index - 1]}"
    return f"context:{stage1['contextual'][index - 1 - len(dominant)]['anchor']}"


def inspect_prompt(
    loaded: LoadedModel, image: Image.Image, prompt: str, config: DuetConfig, *, raw: bool = False
) -> tuple[dict[str, Any], torch.Tensor]:
    """Run one compressed prefill and report what was kept. Returns (json-able dict, pixel_values)."""
    geometry = loaded.adapter.geometry()
    forward = DuetForward(loaded.model, loaded.adapter, config)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, [image], [prompt], config, raw=raw)
    trace = DuetTrace()
    with torch.no_grad():
        forward(**inputs, duet_trace=trace, use_cache=False, logits_to_keep=1)
    stage1 = _stage1_json(trace)
    budget = report(config, geometry)
    tok = loaded.tokenizer
    stage2 = []
    for layer, ratio in zip(config.drop_layers, config.keep_ratios, strict=True):
        kept = trace.stage2.get(layer)
        kept_list = kept[0].tolist() if kept is not None else list(range(trace.visual_tokens))
        stage2.append(
            {
                "layer": layer,
                "keep_ratio": ratio,
                "kept": kept_list,
                "kept_tokens": [_describe_token(i, stage1) for i in kept_list],
            }
        )
    ids = inputs["input_ids"]
    visual = ids == loaded.adapter.image_token_id
    query = inputs.get("duet_query_mask")
    chosen = select_queries(visual, inputs["attention_mask"].bool(), query, None, config.query)
    result = {
        "model": str(loaded.path),
        "family": loaded.adapter.family,
        "prompt": prompt,
        "num_patches": geometry.num_patches,
        "grid": round(geometry.num_patches**0.5),
        "stage1": stage1,
        "stage2": stage2,
        "queries": tok.convert_ids_to_tokens(ids[0][chosen[0]].tolist()) if config.stage2 else [],
        "visual_tokens": trace.visual_tokens,
        "average_tokens": round(budget.average_tokens, 4),
        "reduction": round(budget.reduction, 6),
        "budget": budget.to_dict(),
    }
    return result, inputs["pixel_values"]


def model_view(processor, pixel_values: torch.Tensor) -> np.ndarray:
    """The image as the model saw it (after resize/crop), un-normalised to HxWx3 uint8."""
    ip = processor.image_processor
    mean = np.array(getattr(ip, "image_mean", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    std = np.array(getattr(ip, "image_std", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    arr = pixel_values[0].float().cpu().numpy() * std + mean
    return (np.clip(arr, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)
