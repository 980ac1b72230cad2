"""Analytical FLOPs of vision + prefill, as executed (multiply-adds count 2), for a config on a model.

The full model runs every vision layer (transformers' LLaVA asks the tower for all hidden states) and all
N patches through every decoder layer; with DUET the tower stops at the feature layer, V tokens enter the
decoder and each layer group sees its own count. The stages' own scoring is left out of the count (it is
measured instead: see the overhead figures of `bench`).
"""

from __future__ import annotations

from dataclasses import dataclass

from duet_export.config import DuetConfig
from duet_export.models.base import Adapter

__all__ = ["Flops", "prefill_flops"]


@dataclass(frozen=True)
class Flops:
    vision: float
    decoder: float

    @property
    def total(self) -> float:
        return self.vision + self.decoder


def _decoder_layer(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> float:
    proj = (
        2 * tokens * hidden * (heads * head_dim + 2 * kv_heads * head_dim)
        + 2 * tokens * heads * head_dim * hidden
    )
    mlp = 2 * tokens * 3 * hidden * inter
    attn = 2 * 2 * tokens * tokens * heads * head_dim
    return proj + mlp + attn


def prefill_flops(adapter: Adapter, config: DuetConfig | None, text_tokens: int) -> Flops:
    """FLOPs of one prompt (one image per frame, `text_tokens` text tokens) through vision and prefill."""
    cfg = adapter.model.config
    vc, tc = cfg.vision_config, cfg.text_config
    geometry = adapter.geometry()
    n, frames = geometry.num_patches, geometry.frames
    t = n + 1
    d, i = vc.hidden_size, vc.intermediate_size
    per_layer = 2 * t * 4 * d * d + 2 * t * 2 * d * i + 2 * 2 * t * t * d
    compressed = config is not None and config.stage1
    layers = adapter.feature_layer_index + 1 if compressed else vc.num_hidden_layers
    patch_embed = 2 * n * 3 * vc.patch_size**2 * d
    projector = 2 * adapter.tokens_per_image(config) * (d * tc.hidden_size + tc.hidden_size * tc.hidden_size)
    vision = frames * (patch_embed + layers * per_layer + projector)
    cfg_or_off = config or DuetConfig()
    counts = cfg_or_off.tokens_per_layer(geometry)
    if (
        not compressed
    ):  # the layers before the first drop see what the processor wrote (a video frame: CLS too)
        first = cfg_or_off.group_bounds(geometry.num_layers)[0][1]
        extra = (adapter.uncompressed_tokens_per_image - n) * frames
        counts = [c + extra if k < first else c for k, c in enumerate(counts)]
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    decoder = sum(
        _decoder_layer(text_tokens + c, tc.hidden_size, heads, kv, head_dim, tc.intermediate_size)
        for c in counts
    )
    decoder += 2 * tc.hidden_size * tc.vocab_size  # the last token's logits
    return Flops(vision=float(vision), decoder=float(decoder))
