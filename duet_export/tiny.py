"""Tiny LLaVA checkpoints built offline: the demo's default model, the tests' fixtures, the training base.

`build_tiny_llava(out_dir)` writes a complete Hugging Face LLaVA directory (config, safetensors weights,
tokenizer, image processor, processor with chat template) exactly like a real checkpoint, so everything
else loads it through the same `duet_export.loading.load` path that takes llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from duet_export.atomic import atomic_dir
from duet_export.stages.salient import QUESTION_WORDS, STOP_WORDS

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "TinyLlavaSpec",
    "build_tiny_llava",
    "build_tiny_video_llava",
    "build_word_tokenizer",
    "tiny_vocabulary",
]

# The llava-hf/llava-1.5 chat template (USER/ASSISTANT, images first), without generation markers.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

_WORDS = [
    "user",
    "assistant",
    "image",
    "picture",
    "photo",
    "grid",
    "cell",
    "cells",
    "row",
    "rows",
    "column",
    "columns",
    "digit",
    "digits",
    "number",
    "numbers",
    "frame",
    "frames",
    "clip",
    "video",
    "many",
    "count",
    "counted",
    "appear",
    "appears",
    "appearing",
    "shown",
    "show",
    "shows",
    "visible",
    "see",
    "seen",
    "there",
    "yes",
    "no",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "describe",
    "color",
    "colour",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "gray",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "corner",
    "upper",
    "lower",
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "last",
    "next",
    "image's",
    "answer",
    "word",
    "single",
    "phrase",
    "question",
    "please",
    "tell",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "sky",
    "square",
    "circle",
    "shape",
    "bright",
    "dark",
    "large",
    "small",
    "big",
    "little",
    "read",
]


def tiny_vocabulary() -> list[str]:
    """Special tokens, punctuation, digits, the stop words and the words of the demo and GridDigits prompts."""
    words: list[str] = list(SPECIAL_TOKENS)
    pieces = [*list("?!:.,;'\"()-"), *[str(i) for i in range(100)]]
    pieces += sorted(STOP_WORDS | QUESTION_WORDS)
    pieces += _WORDS
    for w in pieces:
        if w not in words:
            words.append(w)
    return words


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level fast tokenizer with `<image>` (and `<video>`, if listed) as special tokens."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image>",
            **({"video_token": "<video>"} if "<video>" in vocab else {}),
        },
        padding_side="left",
        model_max_length=2048,
    )
    return fast


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA. The defaults run a forward pass in milliseconds on one CPU core."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int | None = None  # default: 2 x vision_hidden
    text_hidden: int = 64
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 1024
    init_range: float = 0.2
    feature_layer: int = -2  # vision_feature_layer, as LLaVA-1.5 (-1: the last layer)
    seed: int = 0


def _llava_config(
    spec: TinyLlavaSpec, vocab_size: int, image_token_id: int, pad_id: int, eos_id: int, bos_id: int
):
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        initializer_range=spec.init_range,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_range,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=spec.init_range,
    )


def build_tiny_llava(out_dir: str | os.PathLike, spec: TinyLlavaSpec | None = None) -> Path:
    """Write a random tiny LLaVA checkpoint (model, tokenizer, processor) to `out_dir`, atomically."""
    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    words = tiny_vocabulary()
    tokenizer = build_word_tokenizer(words)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = _llava_config(
        spec,
        vocab_size=len(words),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        bos_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


def build_tiny_video_llava(
    out_dir: str | os.PathLike, spec: TinyLlavaSpec | None = None, frames: int = 4
) -> Path:
    """Write a random tiny Video-LLaVA checkpoint (`frames` frames per clip) to `out_dir`, atomically.

    The processor files are those of LanguageBind/Video-LLaVA-7B-hf (processor_config.json naming
    VideoLlavaProcessor, the image processor, the chat template), read back by `load_processor`.
    """
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    from duet_export.processors import FrameProcessor

    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    words = tiny_vocabulary()
    words.insert(words.index("<image>") + 1, "<video>")
    tokenizer = build_word_tokenizer(words)
    llava = _llava_config(
        spec,
        vocab_size=len(words),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        bos_id=tokenizer.bos_token_id,
    )
    n = (spec.image_size // spec.patch_size) ** 2
    config = VideoLlavaConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=n,
        video_seq_length=frames * (n + 1),
    )
    config.initializer_range = spec.init_range
    image_processor = VideoLlavaImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = FrameProcessor(
        tokenizer,
        image_processor,
        LLAVA_CHAT_TEMPLATE,
        {
            "processor_class": "VideoLlavaProcessor",
            "patch_size": spec.patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": "<image>",
            "video_token": "<video>",
        },
    )
    torch.manual_seed(spec.seed)
    model = VideoLlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
