"""Model families. Adding one is one module with an `Adapter` subclass, registered here."""

from __future__ import annotations

from torch import nn

from duet_export.errors import DuetError
from duet_export.models.base import Adapter
from duet_export.models.llava import LlavaAdapter
from duet_export.models.qwen2_5_vl import Qwen2_5_VLAdapter
from duet_export.models.video_llava import VideoLlavaAdapter

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "family_of_config"]

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, VideoLlavaAdapter, Qwen2_5_VLAdapter)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a loaded model, or a one-line `DuetError` naming what is supported."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    supported = ", ".join(c for a in ADAPTERS for c in a.model_classes)
    raise DuetError(f"{name} is not a supported model (supported: {supported})")


def family_of_config(architectures: list[str] | None) -> type[Adapter] | None:
    for cls in ADAPTERS:
        if any(a in cls.model_classes for a in architectures or []):
            return cls
    return None
