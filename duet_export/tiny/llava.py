"""Tiny LLaVA and Video-LLaVA checkpoints, written exactly like real ones (config, safetensors, tokenizer,
image processor, processor with chat template)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from duet_export.outputs import atomic_dir
from duet_export.tiny.vocabulary import build_word_tokenizer, padded, tiny_vocabulary

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "TinyLlavaSpec",
    "build_tiny_llava",
    "build_tiny_video_llava",
    "save_random",
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


def save_random(out: Path, model_class, config, processor, seed: int, after_save=None) -> Path:
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
    words = padded(tiny_vocabulary(), spec.vocab_size)
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
    return save_random(out, LlavaForConditionalGeneration, config, processor, spec.seed)


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
    tokenizer = build_word_tokenizer(padded(words, spec.vocab_size))
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
    return save_random(out, VideoLlavaForConditionalGeneration, config, processor, spec.seed)
