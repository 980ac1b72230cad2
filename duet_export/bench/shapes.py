"""Named model shapes for speed work: random weights with a real model's geometry, scaled to run on a CPU."""

from __future__ import annotations

from dataclasses import replace

from duet_export.tiny import TinyLlavaSpec

__all__ = ["REAL_WIDTH", "SHAPES", "SHAPE_FRAMES", "shape_spec"]

# llava-hf/llava-1.5-7b-hf's vocabulary: Llama-2's 32000 tokens, <image> and padding to a multiple of 64.
_LLAVA_VOCAB = 32064

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
    # LLaVA-1.5-7B's real widths at a depth a 2-core, 24 GB machine holds: CLIP ViT-L/14-336 with all its
    # 24 layers (1024 wide), a 4096-wide Llama-2 decoder cut to 4 of its 32 layers (the reference drop
    # schedule scales to drops before layers 2 and 3, keeping the same 0.625 V average), the 32k
    # vocabulary. Matrix products and the vocabulary projection are as large as the real model's, so it
    # shows where time goes at real widths; a bundle is ~10 GB (prefill and step each hold the decoder).
    "llava-1.5-7b-4l": TinyLlavaSpec(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        text_hidden=4096,
        text_layers=4,
        text_heads=32,
        text_kv_heads=32,
        intermediate=11008,
        max_positions=4096,
        init_range=0.02,
        vocab_size=_LLAVA_VOCAB,
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
        vocab_size=_LLAVA_VOCAB,
    ),
}


# Shapes of video models: frames per clip (the others are image models).
SHAPE_FRAMES: dict[str, int] = {"video-llava-mini": 8}

# Shapes at LLaVA-1.5-7B's real widths: several GB a bundle, so `bench` skips its sweep (two more bundles
# per point) and opens one configuration's sessions at a time where memory is short.
REAL_WIDTH = frozenset({"llava-1.5-7b-4l", "llava-1.5-7b"})


def shape_spec(name: str, image_size: int | None = None, layers: int | None = None) -> TinyLlavaSpec:
    """The named shape, optionally at another input resolution (same patch size) or decoder depth."""
    spec = SHAPES[name]
    if image_size is not None:
        spec = replace(spec, image_size=image_size)
    if layers is not None:
        spec = replace(spec, text_layers=layers)
    return spec
