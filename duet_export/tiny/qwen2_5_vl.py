"""A tiny Qwen2.5-VL checkpoint, written like Qwen/Qwen2.5-VL-*-Instruct's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from duet_export.tiny.llava import save_random
from duet_export.tiny.vocabulary import SPECIAL_TOKENS, tiny_vocabulary, word_level

__all__ = ["QWEN_CHAT_TEMPLATE", "TinyQwenSpec", "build_qwen_tokenizer", "build_tiny_qwen2_5_vl"]

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2.5-VL-Instruct chat template's shape (default system turn, <|im_start|>role ... <|im_end|>, an
# image as <|vision_start|><|image_pad|><|vision_end|>), without its tool-calling branches.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with Qwen's special tokens (no BOS, as Qwen) and a newline token."""
    from tokenizers import AddedToken

    tok = word_level({w: i for i, w in enumerate(words)}, "<|endoftext|>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        padding_side="left",
        model_max_length=2048,
    )


@dataclass(frozen=True)
class TinyQwenSpec:
    """Sizes of a tiny Qwen2.5-VL. `image_size` is pinned in the image processor (min = max pixels), so the
    adapter takes it as the fixed resolution: 224 gives 16 x 16 patches, 8 x 8 = 64 merged tokens."""

    image_size: int = 224
    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    window_size: int = 112  # 4 x 4 merged tokens per window, as the real model's 112 px at 14 px patches
    text_hidden: int = 64
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 1024
    init_range: float = 0.2
    seed: int = 0


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, spec: TinyQwenSpec | None = None) -> Path:
    """Write a random tiny Qwen2.5-VL checkpoint to `out_dir`, atomically.

    Its files are those of Qwen/Qwen2.5-VL-*-Instruct (processor_class `Qwen2_5_VLProcessor`, a
    `Qwen2VLImageProcessor` config, chat template), read back by `duet_export.loading.load`.
    """
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from duet_export.processors import image_only_qwen2_5_vl_processor

    spec = spec or TinyQwenSpec()
    if spec.image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {spec.image_size}")
    out = Path(out_dir)
    words = [*QWEN_SPECIAL_TOKENS, "\n", "system", "helpful", "you", "are"]
    words += [w for w in tiny_vocabulary()[len(SPECIAL_TOKENS) :] if w not in words]
    tokenizer = build_qwen_tokenizer(words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    pixels = spec.image_size * spec.image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    processor = image_only_qwen2_5_vl_processor()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    head_dim = spec.text_hidden // spec.text_heads
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    eighth = head_dim // 16  # of head_dim / 2, the rotary frequencies
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": spec.max_positions,
            "initializer_range": spec.init_range,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": None,
            "tie_word_embeddings": False,
            # mrope_section sums to head_dim / 2 (t, h, w); Qwen2.5-VL's [16, 24, 24] has the same shape.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2 * eighth, 3 * eighth, 3 * eighth],
            },
            **token_ids,
        },
        vision_config={
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": spec.window_size,
            # Full attention every other block, the last one included (as Qwen2.5-VL's 7, 15, 23, 31).
            "fullatt_block_indexes": list(range(1, spec.vision_layers, 2)),
            "tokens_per_second": 2,
            "initializer_range": spec.init_range,
        },
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        tie_word_embeddings=False,
        **token_ids,
    )
    if 16 * eighth != head_dim:
        raise ValueError(f"text head_dim {head_dim} must be a multiple of 16 for the M-RoPE sections")

    def stock_processor_class(tmp: Path) -> None:
        # As the hub checkpoints: the stock processor class (which `load_processor` maps to the image-only one).
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = tmp / name
            if path.is_file():
                stored = json.loads(path.read_text())
                if "processor_class" in stored:
                    stored["processor_class"] = "Qwen2_5_VLProcessor"
                    path.write_text(json.dumps(stored, indent=2))

    return save_random(
        out,
        Qwen2_5_VLForConditionalGeneration,
        config,
        processor,
        spec.seed,
        after_save=stock_processor_class,
    )
