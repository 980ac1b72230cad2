"""The three graphs of a bundle as PyTorch modules that `torch.onnx.export(dynamo=True)` can trace.

They reuse `DuetForward.prefill` and the model's own layers, so the exported graph computes what the
PyTorch model computes; every shape is fixed by the budget, the batch and the prompt length.

- `VisionGraph`: pixels -> vision tower up to the feature layer -> Stage 1 (`duet.V2VMerge`) -> projector.
- `PrefillGraph`: prompt ids + image features -> decoder with Stage 2 (`duet.T2VDrop`) -> last logits and
  per-layer K/V, whose lengths differ by layer group.
- `StepGraph`: one token + fixed-capacity per-layer past K/V and per-group masks -> logits and new K/V.
"""

from __future__ import annotations

import torch
from torch import nn

from duet_export.forward import DuetForward, DuetTrace, _Sequence, causal_mask, positions_from_mask

__all__ = ["PrefillGraph", "StepGraph", "VisionGraph"]


class VisionGraph(nn.Module):
    def __init__(self, forward: DuetForward) -> None:
        super().__init__()
        self.fwd = forward

    def forward(self, pixel_values: torch.Tensor):
        adapter, cfg = self.fwd.adapter, self.fwd.config
        out = adapter.vision_layer(pixel_values, need_scores=cfg.stage1)
        if not cfg.stage1:
            return (adapter.project(adapter.uncompressed_tokens(out.hidden)),)
        return adapter.stage1_node(out, cfg)


class _RecordingCache:
    """Stands in for a KV cache during prefill: keeps each layer's K/V so the graph can output them."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys, values, layer_idx, *args, **kwargs):
        self.layers[layer_idx] = (keys, values)
        return keys, values


class _StepCache:
    """Stands in for a KV cache during a decode step: past (fixed capacity) + the new token."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys, values, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (keys, values)
        past_k, past_v = self.past[layer_idx]
        return torch.cat([past_k, keys], dim=2), torch.cat([past_v, values], dim=2)


class PrefillGraph(nn.Module):
    def __init__(self, forward: DuetForward) -> None:
        super().__init__()
        self.fwd = forward

    def forward(self, input_ids, attention_mask, image_features, query_mask, *stage1):
        """`stage1`: the vision graph's `stage1_kept` where positions are kept: the place each visual token
        has in the uncompressed prompt is gathered with it, in the graph."""
        adapter, keep = self.fwd.adapter, self.fwd.keep
        b, t = input_ids.shape
        pad = attention_mask.bool()
        visual = input_ids == adapter.image_token_id
        positions = positions_from_mask(pad, b, t, input_ids.device)
        if keep:
            per_image = adapter.tokens_per_image(self.fwd.config)
            positions = adapter.positions(input_ids, pad, visual, stage1[0] if stage1 else None, per_image)
        seq = _Sequence(
            ids=input_ids,
            hidden=adapter.embed(input_ids),
            pad=pad,
            visual=visual,
            labels=None,
            query=query_mask.to(torch.int8),
            positions=positions,
            recompact=not keep,
        )
        cache, trace = _RecordingCache(), DuetTrace()
        hidden, _ = self.fwd.prefill(seq, image_features, cache, trace, static=True)
        logits = adapter.lm_head(adapter.final_norm(hidden[:, -1:]))
        kv = [x for i in range(len(cache.layers)) for x in cache.layers[i]]
        return (logits, *kv, *trace.keep_index.values())


class StepGraph(nn.Module):
    def __init__(self, forward: DuetForward) -> None:
        super().__init__()
        self.fwd = forward

    def forward(self, input_ids, *flat):
        adapter, groups = self.fwd.adapter, self.fwd.groups
        masks, kv = flat[: len(groups)], flat[len(groups) :]
        past = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        cache = _StepCache(past)
        hidden = adapter.embed(input_ids)
        b = input_ids.shape[0]
        for g, ((start, end), mask) in enumerate(zip(groups, masks, strict=True)):
            mask = mask.bool()
            positions = mask.long().sum(dim=1, keepdim=True)
            offset = adapter.decode_position_offset(self.fwd.cached_visual[g], self.fwd.keep)
            if offset:
                positions = positions + offset
            full = torch.cat([mask, torch.ones((b, 1), dtype=torch.bool, device=mask.device)], dim=1)
            mask4 = causal_mask(full, 1, full.shape[1], mask.device, static=True, dtype=hidden.dtype)
            cos_sin = adapter.rotary(hidden, positions)
            for layer in adapter.decoder_layers[start:end]:
                hidden = layer(
                    hidden,
                    attention_mask=mask4,
                    position_embeddings=cos_sin,
                    position_ids=positions,
                    cache=cache,
                )
        logits = adapter.lm_head(adapter.final_norm(hidden))
        new = [x for i in range(len(past)) for x in cache.new[i]]
        return (logits, *new)
