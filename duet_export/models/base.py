"""The small interface every model family implements, so the stages, export and runtime never branch on it.

An adapter answers three questions about one loaded model: where the vision features (and Stage 1's inputs)
come from, where the decoder layers are and how they are called, and how positions work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from duet_export.config import DuetConfig, Geometry
from duet_export.errors import DuetError
from duet_export.stages.budget import LLAVA_RULES, ReferenceRules
from duet_export.stages.v2v import V2VResult

__all__ = ["Adapter", "AttentionParts", "VisionLayerOutput"]


@dataclass
class VisionLayerOutput:
    """Stage 1's inputs, all from the vision layer whose output the model feeds its projector."""

    hidden: torch.Tensor  # [B, 1+N, D] output of that layer, CLS first
    cls_attention: torch.Tensor | None  # [B, N] CLS-row attention summed over heads (None if not needed)
    keys: torch.Tensor | None  # [B, 1+N, d] that layer's keys averaged over heads


@dataclass
class AttentionParts:
    """What Stage 2 needs from one decoder layer to compute its own attention rows."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


class Adapter(ABC):
    """One model family. Subclasses are registered in `duet_export.models`."""

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    rules: ClassVar[ReferenceRules] = LLAVA_RULES
    media: ClassVar[str] = "image"  # "video": one visual input is a clip of `frames` images
    # The `positions` choices this family takes, its default first: "compact" re-numbers the kept tokens
    # 0..len-1 after Stage 1 and after each drop (ALGORITHM.md, LLaVA's reference); "keep" leaves each at its
    # place in the uncompressed prompt (M-RoPE families always do, as their reference).
    position_modes: ClassVar[tuple[str, ...]] = ("compact", "keep")
    # Keyword inputs of the stock forward that describe the pixels (handed to `visual_features`).
    visual_input_names: ClassVar[tuple[str, ...]] = ()
    # What the vision graph outputs besides the features (`stage1_node`), in order; `stage1_kept` is added
    # where positions are kept (see `stage1_output_names`).
    stage1_outputs: ClassVar[tuple[str, ...]] = ("stage1_dominant", "stage1_anchors")
    # The manifest's description of positions (None: the default, re-compacted positions).
    positions_rule: ClassVar[str | None] = None
    keep_positions_rule: ClassVar[str] = (
        "every token keeps its position in the uncompressed prompt (real tokens before it, each image or frame "
        "counted at its full placeholder length; a Stage-1 token at its image's first position + stage1_kept, "
        "the place of its patch, a contextual token at its anchor's, CLS at the first); no re-compaction after "
        "Stage-2 drops; on a decode step the new token's position is (real tokens in its layer group's cache) "
        "+ decode_position_offsets[group]"
    )
    preprocessing: ClassVar[str] = (
        "the checkpoint's image processor: convert to RGB, resize the shortest edge, center-crop"
    )

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------------ geometry
    @property
    @abstractmethod
    def num_patches(self) -> int:
        """Patches per image (N), CLS excluded."""

    @property
    def frames(self) -> int:
        return 1

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def geometry(self) -> Geometry:
        return Geometry(num_patches=self.num_patches, num_layers=self.num_layers, frames=self.frames)

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    @property
    def uncompressed_tokens_per_image(self) -> int:
        """Placeholder tokens the checkpoint's processor writes per image."""
        return self.num_patches

    def tokens_per_image(self, config: DuetConfig | None) -> int:
        """Visual tokens one image (or frame) feeds the decoder: Stage 1's output when it is on, else as
        many as the processor writes (a video frame keeps its CLS)."""
        if config is not None and config.stage1:
            return config.tokens_per_frame(self.num_patches)
        return self.uncompressed_tokens_per_image

    # ------------------------------------------------------------------ vision side
    def attach_processor(self, processor) -> None:
        """Called by `load` with the checkpoint's processor, for families whose geometry depends on it."""
        return None

    def prompt_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra token-level inputs the stock forward needs next to `input_ids` (none for LLaVA)."""
        return {}

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n_images, 3, H, W] pixels under the keyword (and shape) the stock model's forward takes them.
        `DuetForward` accepts the same keywords, so one set of inputs serves both."""
        return {"pixel_values": pixels}

    @abstractmethod
    def vision_layer(
        self, pixel_values: torch.Tensor, need_scores: bool, score_grad: bool = False
    ) -> VisionLayerOutput:
        """The tower up to and including the layer the projector reads, with Stage 1's scores and keys if
        `need_scores`. The scores only rank patches, so they are computed without gradients unless
        `score_grad` (for a loss on the scores themselves, such as the accuracy table's `--cls-saliency`)."""

    @abstractmethod
    def project(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def uncompressed_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the stock model feeds its projector from the layer's output (e.g. patches without CLS)."""

    def visual_features(
        self, pixel_values: torch.Tensor, config: DuetConfig, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, V2VResult | None]:
        """Projected visual tokens per image [n_images, V_img, D_text], with Stage 1 applied if configured.

        `inputs` holds the `visual_input_names` the caller was given (for checks)."""
        from duet_export.stages.v2v import v2v_merge

        out = self.vision_layer(pixel_values, need_scores=config.stage1)
        if not config.stage1:
            return self.project(self.uncompressed_tokens(out.hidden)), None
        merged = v2v_merge(
            out.hidden, out.cls_attention, out.keys, config.dominant, config.contextual, config.cluster_width
        )
        return self.project(merged.tokens), merged

    def stage1_node(self, out: VisionLayerOutput, config: DuetConfig) -> tuple[torch.Tensor, ...]:
        """Stage 1 as one `duet.V2VMerge` node for export: (features, *`stage1_output_names(config)`)."""
        from duet_export.stages.ops import v2v_merge_node

        tokens, dominant, anchors = v2v_merge_node(
            out.hidden, out.cls_attention, out.keys, config.dominant, config.contextual, config.cluster_width
        )
        if self.keeps_positions(config):
            return self.project(tokens), dominant, anchors, self.kept_places(dominant, anchors)
        return self.project(tokens), dominant, anchors

    def stage1_output_names(self, config: DuetConfig) -> tuple[str, ...]:
        """The vision graph's outputs after the features when Stage 1 is on: what `stage1_node` returns."""
        if self.keeps_positions(config) and "stage1_kept" not in self.stage1_outputs:
            return (*self.stage1_outputs, "stage1_kept")
        return self.stage1_outputs

    def export_pixels(self, images: int, dtype: torch.dtype) -> torch.Tensor:
        """Example pixels for `images` images, in the layout `pixel_values` has (the export's input shape)."""
        size = self.image_size
        return torch.zeros((images, 3, size, size), dtype=dtype)

    # ------------------------------------------------------------------ positions
    def position_mode(self, config: DuetConfig | None) -> str:
        """ "compact" or "keep" for `config` on this family (its default when the config names none); a
        choice the family cannot honour is a one-line error, never silently ignored."""
        chosen = config.positions if config is not None else None
        if chosen is None:
            return self.position_modes[0]
        if chosen not in self.position_modes:
            raise DuetError(self._positions_refusal(chosen))
        return chosen

    def _positions_refusal(self, chosen: str) -> str:
        return f"{self.family} takes positions {' or '.join(self.position_modes)}, not {chosen!r}"

    def keeps_positions(self, config: DuetConfig | None) -> bool:
        return self.position_mode(config) == "keep"

    def kept_places(self, dominant: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """[n, K_d + K_c] place of each Stage-1 token (CLS, dominant..., contextual...) within its image's
        uncompressed placeholder run: a patch's own place, a contextual token its anchor's, CLS the first
        (its own where the stock model feeds CLS, as Video-LLaVA's frames do; else patch 0's)."""
        shift = self.uncompressed_tokens_per_image - self.num_patches  # 1 where CLS leads the run
        cls = torch.zeros_like(dominant[:, :1])
        return torch.cat([cls, dominant + shift, anchors + shift], dim=1)

    def stage1_kept(self, stage1: V2VResult) -> torch.Tensor:
        """What `positions` takes as `kept` for one Stage-1 result (PyTorch), as the vision graph outputs it."""
        return self.kept_places(stage1.dominant, stage1.anchors)

    def positions(
        self,
        ids: torch.Tensor,
        pad: torch.Tensor,
        visual: torch.Tensor,
        kept: torch.Tensor | None,
        per_image: int,
    ) -> torch.Tensor:
        """Kept prefill positions for `ids` (image placeholders already fitted to Stage 1's output), [B, T]:
        the places the tokens have in the uncompressed prompt, counted over real tokens as `generate()`
        does. Every image (or frame) before a token counts `uncompressed_tokens_per_image`; a visual token
        adds its place in its image's run, from `kept` ([n_images, per_image] or [B, images x per_image],
        `stage1_kept`) or its rank where Stage 1 is off. M-RoPE families return [3, B, T]."""
        span = self.uncompressed_tokens_per_image
        vis = (visual & pad).long()
        text = (~visual & pad).long()
        seen = vis.cumsum(dim=1)  # visual tokens up to and including this one
        rank = (seen - 1).clamp(min=0)
        images_before = torch.div(seen - vis, per_image, rounding_mode="floor")
        if kept is None:
            place = rank % per_image
        else:
            flat = kept.to(ids.device).reshape(ids.shape[0], -1)
            place = torch.gather(flat, 1, rank.clamp(max=flat.shape[1] - 1))
        pos = text.cumsum(dim=1) - text + images_before * span + torch.where(vis.bool(), place, 0)
        return pos.masked_fill(~pad, 0)

    def decode_position_offset(self, visual_tokens: int, keep: bool = False) -> int:
        """Added to a generated token's position (real tokens cached in its layer group) when that group
        caches `visual_tokens` visual tokens per prompt: 0 where positions are re-compacted; with kept
        positions the uncompressed visual block's length less what the group still holds."""
        return self.uncompressed_tokens_per_image * self.frames - visual_tokens if keep else 0

    # ------------------------------------------------------------------ decoder side
    # The Hugging Face VLM layout every family so far shares (`model.model.language_model`, a Llama/Qwen2-style
    # decoder, and `model.lm_head`); a family with another layout overrides these.
    @property
    def _lm(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self._lm.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._lm.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `position_ids` ([B, T]; M-RoPE decoders also take [3, B, T])."""
        return self._lm.rotary_emb(hidden, position_ids=position_ids)

    def attention_parts(self, layer: nn.Module) -> AttentionParts:
        cfg = self.text_config
        attn = layer.self_attn
        return AttentionParts(
            input_norm=layer.input_layernorm,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=attn.head_dim,
            scale=attn.scaling,
        )

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm.norm(hidden)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    @property
    def text_config(self):
        return self.model.config.text_config

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The model's parameters by part, for `train --train`: "vision", "projector", "llm"."""
