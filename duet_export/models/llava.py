"""LLaVA-1.5 (`LlavaForConditionalGeneration`, transformers 5.x): CLIP vision tower with CLS, Llama-like decoder."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from duet_export.errors import DuetError
from duet_export.models.base import Adapter, VisionLayerOutput
from duet_export.stages.v2v import cls_attention_and_keys

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise DuetError(f"Stage 1 needs a single vision_feature_layer; this checkpoint uses {layer}")
        tower = self.tower
        if not hasattr(tower, "encoder") or not hasattr(tower, "embeddings"):
            raise DuetError(
                f"unsupported vision tower {type(tower).__name__}: DUET needs a CLIP-style tower with a CLS token"
            )
        n_layers = len(tower.encoder.layers)
        # hidden_states[k] is the output of encoder layer k - 1 (hidden_states[0] is the embedding).
        index = layer if layer >= 0 else n_layers + 1 + layer
        if not 1 <= index <= n_layers:
            raise DuetError(f"vision_feature_layer {layer} has no attention layer behind it")
        self.feature_layer_index = index - 1
        self.select_strategy = cfg.vision_feature_select_strategy
        vc = cfg.vision_config
        self.image_size = vc.image_size
        self.patch_size = vc.patch_size

    @property
    def tower(self) -> nn.Module:
        """The CLIP tower that encodes this family's visual input."""
        return self.model.model.vision_tower

    # ------------------------------------------------------------------ geometry
    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def uncompressed_tokens_per_image(self) -> int:
        return self.num_patches + (1 if self.select_strategy == "full" else 0)

    # ------------------------------------------------------------------ vision side
    def vision_layer(
        self, pixel_values: torch.Tensor, need_scores: bool, score_grad: bool = False
    ) -> VisionLayerOutput:
        tower = self.tower
        hidden = tower.embeddings(pixel_values.to(dtype=tower.embeddings.patch_embedding.weight.dtype))
        hidden = tower.pre_layrnorm(hidden)
        layers = tower.encoder.layers
        for layer in layers[: self.feature_layer_index]:
            hidden = layer(hidden, None)
        last = layers[self.feature_layer_index]
        cls_attention = keys = None
        if need_scores:
            attn = last.self_attn
            with nullcontext() if score_grad else torch.no_grad():
                cls_attention, keys = cls_attention_and_keys(
                    last.layer_norm1(hidden), attn.q_proj, attn.k_proj, attn.num_heads, attn.scale
                )
        return VisionLayerOutput(hidden=last(hidden, None), cls_attention=cls_attention, keys=keys)

    def uncompressed_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 1:] if self.select_strategy == "default" else hidden

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(tokens)

    # ------------------------------------------------------------------ decoder side (Adapter's defaults)
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        inner = self.model.model
        return {
            "vision": list(self.tower.parameters()),
            "projector": list(inner.multi_modal_projector.parameters()),
            "llm": [*inner.language_model.parameters(), *self.model.lm_head.parameters()],
        }
