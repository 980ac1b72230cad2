"""Named model shapes for speed work: random weights with a real model's geometry, scaled to run on a CPU."""

from __future__ import annotations

from dataclasses import replace

from duet_export.tiny import TinyLlavaSpec

__all__ = ["SHAPES", "SHAPE_FRAMES", "shape_spec"]

SHAPES: dict[str, TinyLlavaSpec] = {
    # LLaVA-1.5 geometry (336 px, patch 14 -> 576 patches + CLS, 32 decoder layers, drops at 16 and 24),
    # with the widths scaled down so that a prefill takes a fraction of a second on 2 cores.
    "llava-1.5-mini": TinyLlavaSpec(
        image_size=336,
        patch_size=14,
        vision_hidden=128,
        vision_intermediate=512,
        vision_layers=6,
        vision_heads=4,
        text_hidden=256,
        text_layers=32,
        text_heads=4,
        text_kv_heads=4,
        intermediate=688,
        max_positions=4096,
        init_range=0.02,
    ),
    # Video-LLaVA-7B geometry (8 frames of 224 px, patch 14 -> 8 x (256 + CLS) visual tokens, 32 decoder
    # layers), the widths scaled down as llava-1.5-mini's.
    "video-llava-mini": TinyLlavaSpec(
        image_size=224,
        patch_size=14,
        vision_hidden=128,
        vision_intermediate=512,
        vision_layers=6,
        vision_heads=4,
        text_hidden=256,
        text_layers=32,
        text_heads=4,
        text_kv_heads=4,
        intermediate=688,
        max_positions=4096,
        init_range=0.02,
    ),
    # LLaVA-1.5-7B's real sizes (for GPUs): CLIP ViT-L/14-336 (24 layers, 1024 wide), Llama-2-7B decoder.
    "llava-1.5-7b": TinyLlavaSpec(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        text_hidden=4096,
        text_layers=32,
        text_heads=32,
        text_kv_heads=32,
        intermediate=11008,
        max_positions=4096,
        init_range=0.02,
    ),
}


# Shapes of video models: frames per clip (the others are image models).
SHAPE_FRAMES: dict[str, int] = {"video-llava-mini": 8}


def shape_spec(name: str, image_size: int | None = None) -> TinyLlavaSpec:
    """The named shape, optionally at another input resolution (same patch size)."""
    spec = SHAPES[name]
    return spec if image_size is None else replace(spec, image_size=image_size)
