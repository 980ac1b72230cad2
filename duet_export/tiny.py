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
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from duet_export.outputs import atomic_dir
from duet_export.stages.salient import QUESTION_WORDS, STOP_WORDS

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


def _padded(words: list[str], size: int | None) -> list[str]:
    """`words`, then filler words up to `size` entries (real checkpoints' vocabularies are that wide)."""
    if size is None or size <= len(words):
        return words
    return words + [f"filler{i:05d}" for i in range(size - len(words))]


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


def _word_level(vocab: dict[str, int], unk: str) -> Tokenizer:
    """Lower-casing, whitespace- and punctuation-split word-level model over `vocab`."""
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return tok


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level fast tokenizer with `<image>` (and `<video>`, if listed) as special tokens."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = _word_level(vocab, "<unk>")
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
    # Vocabulary of the decoder (embedding and LM head). None: the tiny word list's own size. A larger one
    # (LLaVA-1.5's 32k) pads the tokenizer with filler words, so every id the model can emit decodes.
    vocab_size: int | None = None


def _llava_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast):
    """A LLaVA config of `spec`'s sizes whose special token ids are `tokenizer`'s."""
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
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=spec.init_range,
    )


def _save_random(out: Path, model_class, config, processor, seed: int, after_save=None) -> Path:
    """Build `model_class(config)` with seeded random weights, take the generation ids from the tokenizer,
    and save model + processor to `out` atomically (`after_save(tmp)` may adjust the files first)."""
    torch.manual_seed(seed)
    model = model_class(config)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if after_save is not None:
            after_save(Path(tmp))
    return out


def build_tiny_llava(out_dir: str | os.PathLike, spec: TinyLlavaSpec | None = None) -> Path:
    """Write a random tiny LLaVA checkpoint (model, tokenizer, processor) to `out_dir`, atomically."""
    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    words = _padded(tiny_vocabulary(), spec.vocab_size)
    tokenizer = build_word_tokenizer(words)
    # the PIL processor by name: CLIPImageProcessor itself falls back to it without torchvision, with a warning
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
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
    config = _llava_config(spec, tokenizer)
    return _save_random(out, LlavaForConditionalGeneration, config, processor, spec.seed)


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
    tokenizer = build_word_tokenizer(_padded(words, spec.vocab_size))
    llava = _llava_config(spec, tokenizer)
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
    return _save_random(out, VideoLlavaForConditionalGeneration, config, processor, spec.seed)


# ---------------------------------------------------------------------------------------------- Qwen2.5-VL
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

    tok = _word_level({w: i for i, w in enumerate(words)}, "<|endoftext|>")
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

    return _save_random(
        out,
        Qwen2_5_VLForConditionalGeneration,
        config,
        processor,
        spec.seed,
        after_save=stock_processor_class,
    )
