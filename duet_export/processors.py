"""Load a checkpoint's (or bundle's) processor, for the PyTorch path and the torch-free runtime alike.

Most families load with `AutoProcessor`. Video-LLaVA's processor cannot be built without torchvision (its
video processor is torchvision-only in transformers 5), yet its frames need nothing more than the image
processor: the stock video processor applies the same CLIP resize, crop and normalisation to every frame.
So a video checkpoint gets a `FrameProcessor` made of its own tokenizer, image processor and chat template,
and its prompts are expanded here exactly as the stock processor would (frames x (1 + N) placeholders).

Qwen2.5-VL's processor class also names a (torchvision-only) video processor, so `AutoProcessor` fails on
its checkpoints. They get `image_only_qwen2_5_vl_processor()`: the stock processor minus the video part,
which can also resize every image to one fixed resolution first (DUET's budget needs a fixed token count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from duet_export.errors import DuetError

__all__ = ["FrameProcessor", "image_only_qwen2_5_vl_processor", "load_processor", "refuse_custom_code"]

_FRAME_PROCESSORS = ("VideoLlavaProcessor",)
_QWEN_PROCESSORS = ("Qwen2_5_VLProcessor", "ImageOnlyQwen2_5_VLProcessor")
_QWEN_CLASS = None


class FrameProcessor:
    """Tokenizer + image processor + chat template of a video checkpoint (the parts DUET's prompts use)."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None, config: dict) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.config = config
        self.image_token = config.get("image_token", "<image>")
        self.video_token = config.get("video_token", "<video>")

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False):
        return self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
        )

    def __call__(self, images=None, text=None, return_tensors="np", **kwargs):
        raise DuetError("a video checkpoint's prompts are built by duet_export.prompts.encode_prompts")

    def save_pretrained(self, out: str | os.PathLike) -> None:
        """Write the same files a checkpoint holds, so AutoProcessor (with torchvision) can load them too."""
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template)
        (out / "processor_config.json").write_text(json.dumps(self.config, indent=2))


def image_only_qwen2_5_vl_processor() -> type:
    """`Qwen2_5_VLProcessor` without a video processor (that one needs torchvision), built on first use so
    this module imports without transformers' processing code.

    Set `duet_image_size = (height, width)` on an instance and every image is resized to exactly that
    before the stock image processor runs (which then keeps it, as long as height * width lies within its
    min/max pixels): one resolution, one grid, one token count per image.
    """
    global _QWEN_CLASS
    if _QWEN_CLASS is not None:
        return _QWEN_CLASS
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        duet_image_size: tuple[int, int] | None = None

        # `ProcessorMixin` reads its attributes from this signature: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise DuetError("this Qwen2.5-VL processor takes images only (videos need torchvision)")
            if images is not None and self.duet_image_size is not None:
                images = _resized(images, self.duet_image_size)
            return super().__call__(images=images, text=text, **kwargs)

    _QWEN_CLASS = ImageOnlyQwen2_5_VLProcessor
    return _QWEN_CLASS


def _resized(images, size: tuple[int, int]):
    """PIL images (or nested lists of them) resized to (height, width); anything else is left as given."""
    from PIL import Image

    if isinstance(images, Image.Image):
        height, width = size
        image = images.convert("RGB")
        return image if image.size == (width, height) else image.resize((width, height), Image.BICUBIC)
    if isinstance(images, (list, tuple)):
        return [_resized(image, size) for image in images]
    return images


def _processor_class(root: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = root / name
        if path.is_file():
            try:
                cls = json.loads(path.read_text()).get("processor_class")
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if cls:
                return cls
    return None


def _chat_template(root: Path, tokenizer) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = root / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_CONFIG_FILES = (
    "config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


def refuse_custom_code(path: str | os.PathLike) -> None:
    """A one-line `DuetError` naming the file when a checkpoint or bundle asks for its own Python code
    (an `auto_map`): duet-export never runs code that came with a model. Loading passes
    `trust_remote_code=False` too; this check says which file asked, instead of transformers' prompt."""
    root = Path(path)
    for name in _CONFIG_FILES:
        file = root / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # the loader reports unreadable files
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            modules = sorted(
                {
                    str(v).split(".")[0] + ".py"
                    for value in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
                    for v in (value if isinstance(value, (list, tuple)) else [value])
                    if v
                }
            )
            raise DuetError(
                f"{file} asks to run the model's own code ({', '.join(modules) or 'auto_map'}): duet-export "
                "never runs code shipped with a model; remove 'auto_map' if the stock classes fit"
            )


def load_processor(path: str | os.PathLike):
    """The processor stored in `path`: a `FrameProcessor` for video checkpoints, the image-only processor
    for Qwen2.5-VL, else `AutoProcessor`'s.

    Refuses a folder whose configs ask for custom code (`refuse_custom_code`); raises exceptions from
    transformers unchanged otherwise, and callers turn them into one-line errors.
    """
    import transformers

    root = Path(path)
    refuse_custom_code(root)
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        raise DuetError(f"{root} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    cls = _processor_class(root)
    if cls in _QWEN_PROCESSORS:
        return image_only_qwen2_5_vl_processor().from_pretrained(root, trust_remote_code=False)
    if cls not in _FRAME_PROCESSORS:
        return transformers.AutoProcessor.from_pretrained(root, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    image_processor = transformers.AutoImageProcessor.from_pretrained(root, trust_remote_code=False)
    stored = root / "processor_config.json"
    config = json.loads(stored.read_text()) if stored.is_file() else {"processor_class": cls}
    return FrameProcessor(tokenizer, image_processor, _chat_template(root, tokenizer), config)
