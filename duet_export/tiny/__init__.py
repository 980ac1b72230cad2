"""Tiny checkpoints built offline: the demo's default model, the tests' fixtures, the accuracy table's base.

Each builder writes a complete Hugging Face directory (config, safetensors weights, tokenizer, image
processor, processor with chat template) exactly like a real checkpoint, so everything else loads it through
the same `duet_export.loading.load` path that takes llava-hf/llava-1.5-7b-hf. One module per family.
"""

from duet_export.tiny.llava import (
    LLAVA_CHAT_TEMPLATE,
    TinyLlavaSpec,
    build_tiny_llava,
    build_tiny_video_llava,
)
from duet_export.tiny.qwen2_5_vl import QWEN_CHAT_TEMPLATE, TinyQwenSpec, build_tiny_qwen2_5_vl
from duet_export.tiny.vocabulary import build_word_tokenizer, tiny_vocabulary

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "QWEN_CHAT_TEMPLATE",
    "TinyLlavaSpec",
    "TinyQwenSpec",
    "build_tiny_llava",
    "build_tiny_qwen2_5_vl",
    "build_tiny_video_llava",
    "build_word_tokenizer",
    "tiny_vocabulary",
]
