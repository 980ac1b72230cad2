"""Video-LLaVA (`VideoLlavaForConditionalGeneration`, transformers 5.x) on video clips.

The same CLIP + Llama layout as LLaVA-1.5, with its own video tower. A clip is `frames` images through
that tower; every frame keeps its CLS token (the stock model feeds all 1 + N tokens per frame), Stage 1
merges per frame and Stage 2 ranks all visual tokens of the clip together. The frame count is the one the
checkpoint was trained with: `video_seq_length / (1 + N)` (8 for LanguageBind/Video-LLaVA-7B-hf).
Budgets resolve with the reference's video setting (`VIDEO_LLAVA_RULES`: 960 -> 160 + 32 per frame).
"""

from __future__ import annotations

import torch
from torch import nn

from duet_export.errors import DuetError
from duet_export.models.llava import LlavaAdapter
from duet_export.stages.budget import VIDEO_LLAVA_RULES

__all__ = ["VideoLlavaAdapter"]


class VideoLlavaAdapter(LlavaAdapter):
    family = "video-llava"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    media = "video"
    rules = VIDEO_LLAVA_RULES  # the reference's clip setting, not the image one (see stages/budget.py)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        per_frame = self.num_patches + 1
        seq = model.config.video_seq_length
        if seq % per_frame:
            raise DuetError(
                f"video_seq_length {seq} is not a whole number of frames of {per_frame} tokens (CLS + patches)"
            )
        self._frames = seq // per_frame

    @property
    def tower(self) -> nn.Module:
        return self.model.model.video_tower

    @property
    def frames(self) -> int:
        return self._frames

    @property
    def image_token_id(self) -> int:
        """The clip's placeholder token (`<video>`)."""
        return self.model.config.video_token_id

    @property
    def uncompressed_tokens_per_image(self) -> int:
        return self.num_patches + 1  # video features keep CLS whatever the select strategy

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values_videos": pixels.reshape(-1, self.frames, *pixels.shape[1:])}

    def uncompressed_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().parameter_groups()
        groups["vision"] = [*groups["vision"], *self.model.model.image_tower.parameters()]
        return groups
