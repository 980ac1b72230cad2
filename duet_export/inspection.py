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


def _stage1_json(trace: DuetTrace, row: int) -> dict[str, Any] | None:
    """Stage 1 on one image (row of the vision batch; a clip's frames are consecutive rows)."""
    s1 = trace.stage1
    if s1 is None:
        return None
    anchors = s1.anchors[row].tolist()
    members: list[list[int]] = [[] for _ in anchors]
    for patch, slot in zip(s1.members[row].tolist(), s1.assignment[row].tolist(), strict=True):
        members[slot].append(patch)
    out = {
        "order": "CLS, dominant patches in position order, contextual tokens in anchor order",
        "cls": True,
        "dominant": s1.dominant[row].tolist(),
        "contextual": [{"anchor": a, "members": sorted(m)} for a, m in zip(anchors, members, strict=True)],
        "tokens": 1 + s1.dominant.shape[1] + len(anchors),
    }
    if s1.kept is not None:  # no CLS; every token in its patch's place (Qwen2.5-VL)
        out.update(
            order="tokens in patch order, each contextual token in its anchor's place",
            cls=False,
            kept=s1.kept[row].tolist(),
            tokens=s1.kept.shape[1],
        )
    return out


def _describe_token(index: int, stage1: dict[str, Any] | None, with_cls: bool = False) -> str:
    """Name one image's visual token: 'cls', 'patch:<i>' or 'context:<anchor>'."""
    if stage1 is None:
        if not with_cls:
            return f"patch:{index}"
        return "cls" if index == 0 else f"patch:{index - 1}"
    if "kept" in stage1:
        patch = stage1["kept"][index]
        anchors = {c["anchor"] for c in stage1["contextual"]}
        return f"{'context' if patch in anchors else 'patch'}:{patch}"
    if index == 0:
        return "cls"
    dominant = stage1["dominant"]
    if index <= len(dominant):
        return f"patch:{dominant[index - 1]}"
    return f"context:{stage1['contextual'][index - 1 - len(dominant)]['anchor']}"


def _describe_clip_token(
    index: int, frames: list[dict[str, Any] | None], per_frame: int, with_cls: bool
) -> str:
    """A clip's visual token: 'f<frame>:' + the frame's own token name (images: no prefix)."""
    if len(frames) == 1:
        return _describe_token(index, frames[0], with_cls)
    frame, local = divmod(index, per_frame)
    return f"f{frame}:{_describe_token(local, frames[frame], with_cls)}"


def inspect_prompt(
    loaded: LoadedModel,
    image: Image.Image | list[Image.Image],
    prompt: str,
    config: DuetConfig,
    *,
    raw: bool = False,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Run one compressed prefill and report what was kept. Returns (json-able dict, the model's view of the
    image or of each frame, for `write_overlay`)."""
    geometry = loaded.adapter.geometry()
    forward = DuetForward(loaded.model, loaded.adapter, config)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, [image], [prompt], config, raw=raw)
    trace = DuetTrace()
    with torch.no_grad():
        forward(**inputs, duet_trace=trace, use_cache=False, logits_to_keep=1)
    n_frames = geometry.frames
    frames = [_stage1_json(trace, f) for f in range(n_frames)]
    per_frame = trace.visual_tokens // n_frames
    with_cls = per_frame > geometry.num_patches  # e.g. a video frame fed whole, CLS included

    def describe(index: int) -> str:
        return _describe_clip_token(index, frames, per_frame, with_cls)

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
                "kept_tokens": [describe(i) for i in kept_list],
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
        "grid": list(_grid(loaded.adapter)),
        "frames": n_frames,
        # one image: its Stage-1 record; a clip: one record per frame
        "stage1": frames[0] if n_frames == 1 else (frames if frames[0] is not None else None),
        "stage2": stage2,
        "queries": tok.convert_ids_to_tokens(ids[0][chosen[0]].tolist()) if config.stage2 else [],
        "visual_tokens": trace.visual_tokens,
        "positions": loaded.adapter.position_mode(config),
        "average_tokens": round(budget.average_tokens, 4),
        "reduction": round(budget.reduction, 6),
        "budget": budget.to_dict(),
    }
    pixels = (
        inputs["pixel_values"] if "pixel_values" in inputs else inputs["pixel_values_videos"].flatten(0, 1)
    )
    if pixels.dim() == 4:
        views = model_view(loaded.processor, pixels, n_frames)
    else:  # patch rows (Qwen2.5-VL): the image at the model's fixed resolution
        height, width = loaded.adapter.image_size
        views = [np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC))]
    return result, views


def _grid(adapter) -> tuple[int, int]:
    """Rows and columns of the visual tokens over one image (merged tokens for Qwen2.5-VL)."""
    size = adapter.image_size
    if isinstance(size, tuple):
        rows = round((adapter.num_patches * size[0] / size[1]) ** 0.5)
        return rows, adapter.num_patches // rows
    side = round(adapter.num_patches**0.5)
    return side, side


def model_view(processor, pixel_values: torch.Tensor, frames: int = 1) -> list[np.ndarray]:
    """The image (or each frame) as the model saw it (after resize/crop), un-normalised to HxWx3 uint8."""
    ip = processor.image_processor
    mean = np.array(getattr(ip, "image_mean", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    std = np.array(getattr(ip, "image_std", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    views = []
    for f in range(frames):
        arr = pixel_values[f].float().cpu().numpy() * std + mean
        views.append((np.clip(arr, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8))
    return views
