"""Load a Hugging Face VLM checkpoint directory (real or tiny) with its processor and family adapter."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image

from duet_export.errors import DuetError, one_line
from duet_export.images import open_rgb_image
from duet_export.models import ADAPTERS, Adapter, family_of_config
from duet_export.processors import load_processor, refuse_custom_code
from duet_export.video import open_clip

__all__ = ["LoadedModel", "load", "load_image", "load_visual"]


@dataclass
class LoadedModel:
    """A model, its processor and its adapter: what every command works on."""

    model: torch.nn.Module
    processor: object
    adapter: Adapter
    path: Path

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise DuetError(f"{path}: no such model directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DuetError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DuetError(f"{cfg_file} is not valid JSON ({e.__class__.__name__})") from None


def load(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Load model + processor from `model_dir`; any problem is a one-line `DuetError`."""
    path = Path(model_dir)
    cfg = _read_config(path)
    family = family_of_config(cfg.get("architectures"))
    if family is None:
        supported = ", ".join(c for a in ADAPTERS for c in a.model_classes)
        found = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "unknown")
        raise DuetError(f"{path} holds a {found} checkpoint; supported: {supported}")
    refuse_custom_code(path)
    model_cls = getattr(transformers, family.model_classes[0])
    try:
        model = model_cls.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False
        )
    except Exception as e:  # corrupt weights, missing shards, incompatible config
        raise DuetError(f"could not load the model in {path}: {one_line(e)}") from None
    try:
        processor = load_processor(path)
    except DuetError:
        raise
    except Exception as e:
        raise DuetError(f"could not load the processor in {path}: {one_line(e)}") from None
    model.to(device).eval()
    adapter = family(model)
    adapter.attach_processor(processor)
    return LoadedModel(model=model, processor=processor, adapter=adapter, path=path)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, or raise a one-line `DuetError` (the runtime's rule: `open_rgb_image`)."""
    return open_rgb_image(path)


def load_visual(path: str | os.PathLike, adapter: Adapter) -> Image.Image | list[Image.Image]:
    """What the model takes as one visual input: an RGB image, or for a video model the clip's frames
    (from a folder of frames or a video file)."""
    if adapter.media == "video":
        return open_clip(path, adapter.frames)
    return load_image(path)
