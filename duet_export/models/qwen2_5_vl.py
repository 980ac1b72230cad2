"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, transformers 5.x): windowed ViT without CLS, M-RoPE decoder.

What differs from LLaVA, following the reference (`qwen2_5_vl/modeling_qwen2_5vl_duet.py` of DUET-VLM):

- One fixed resolution (H, W), multiples of 28, so every image has the same N = (H/28)(W/28) merged tokens
  and the budget (and an exported graph) has fixed shapes. It comes from the checkpoint's image processor
  when that pins one (min_pixels = max_pixels = s^2), else 448 x 448; `load` hands it to the processor,
  which resizes every image to exactly (H, W), and records it on the model (`duet_image_size`).
- Stage 1 scores each patch by the attention it *receives* in the last vision block (softmax over keys,
  mean over heads, sum over all queries), averages scores and keys over each 2 x 2 merge unit, and merges
  the **projected** tokens (the merger's output), as the reference does. With no CLS, `dominant` counts
  patches only (a zero "CLS" row is put in front so `v2v_merge` runs unchanged, then removed). The kept
  tokens are put back in raster order (each contextual token in its anchor's slot).
- Positions are M-RoPE (t, h, w). Every kept token keeps the position it has in the uncompressed prompt,
  through Stage 1 and Stage 2 (no re-compaction), and generated tokens continue where the uncompressed
  model's would: `decode_position_offset`.
- One image per prompt (as the reference): the decode offset depends on the image count, which a decode
  step cannot see.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import nn

from duet_export.config import DuetConfig, Geometry
from duet_export.errors import DuetError
from duet_export.models.base import Adapter, VisionLayerOutput
from duet_export.stages.budget import ReferenceRules
from duet_export.stages.t2v import gather_rows
from duet_export.stages.v2v import V2VResult, v2v_merge

__all__ = ["QWEN2_5_VL_RULES", "Qwen2_5_VLAdapter", "fixed_resolution"]

DEFAULT_IMAGE_SIZE = (448, 448)
MERGED_PATCH = 28  # patch 14 x spatial merge 2: one decoder token per 28 x 28 pixels

# The reference's setting: 540 dominant + 100 contextual, drop before layers [14, 21] of 28 keeping
# [0.5, 0.25] of V. The contextual share 100/640 is held at every budget (the reference has one setting).
QWEN2_5_VL_RULES = ReferenceRules(
    drop_fractions=(0.5, 0.75), keep_ratios=(0.5, 0.25), contextual_anchors=((0.0, 100 / 640),)
)


def fixed_resolution(image_processor) -> tuple[int, int]:
    """(H, W) for a Qwen2-VL image processor: the one it pins (min = max pixels, a square of a multiple of
    28), else 448 x 448 moved (as a square of a multiple of 28) into its [min, max] pixel range."""
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
    if low == high:
        side = round(low**0.5)
        if side * side == low and side % MERGED_PATCH == 0:
            return side, side
    side = DEFAULT_IMAGE_SIZE[0]
    while side * side > high and side > MERGED_PATCH:
        side -= MERGED_PATCH
    while side * side < low:
        side += MERGED_PATCH
    if not low <= side * side <= high:
        raise DuetError(f"no square resolution of a multiple of 28 px lies within [{low}, {high}] pixels")
    return side, side


class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2.5-vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    rules = QWEN2_5_VL_RULES
    position_modes: ClassVar[tuple[str, ...]] = ("keep",)  # M-RoPE positions are always kept
    visual_input_names: ClassVar[tuple[str, ...]] = ("image_grid_thw",)
    stage1_outputs: ClassVar[tuple[str, ...]] = ("stage1_dominant", "stage1_anchors", "stage1_kept")
    preprocessing = (
        "convert to RGB, resize to exactly the bundle's size (bicubic), then the checkpoint's image processor "
        "(rescale, normalise, 14 px patches in 2 x 2 merge order)"
    )
    positions_rule = (
        "M-RoPE (t, h, w): every token keeps its position in the uncompressed prompt (text: real text tokens "
        "before it + max(h', w') per image before it; image token (r, c): base + (0, r, c), the cell from "
        "stage1_kept); no re-compaction after Stage-2 drops; on a decode step the new token's position is "
        "(real tokens in its layer group's cache) + decode_position_offsets[group], the same in all three axes"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vc = model.config.vision_config
        self.patch_size = vc.patch_size
        self.merge = vc.spatial_merge_size
        self.temporal_patch = vc.temporal_patch_size
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        self.set_resolution(*(getattr(model, "duet_image_size", None) or DEFAULT_IMAGE_SIZE))

    # ------------------------------------------------------------------ resolution and geometry
    def set_resolution(self, height: int, width: int) -> None:
        """Fix (H, W) and precompute the vision tower's grid constants for it (window order, segments)."""
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        unit = self.patch_size * self.merge
        if height % unit or width % unit or height <= 0 or width <= 0:
            raise DuetError(f"image resolution {height}x{width} is not a multiple of {unit} px")
        self.image_size = (height, width)
        self.model.duet_image_size = (height, width)  # recorded for later adapters (compress, export)
        self.grid = (1, height // self.patch_size, width // self.patch_size)  # (t, h, w) in patches
        self.merged_grid = (height // unit, width // unit)  # (h', w') decoder tokens
        grid = torch.tensor([self.grid])
        window_index, cu_window = get_vision_window_index(
            grid, self.merge, self.tower.window_size, self.patch_size
        )
        self.window_index = window_index  # merge units in window order
        self.reverse_index = torch.argsort(window_index)
        lengths = (cu_window[1:] - cu_window[:-1]).tolist()
        self.window_lengths = [int(n) for n in lengths if n > 0]  # Python ints: constants in a graph
        self.vision_positions = get_vision_position_ids(grid, self.merge)  # [S, 2] (h, w) per patch

    def attach_processor(self, processor) -> None:
        """Take the fixed resolution from the processor's image processor and make the processor use it."""
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None:
            self.set_resolution(*fixed_resolution(image_processor))
        if hasattr(type(processor), "duet_image_size"):
            processor.duet_image_size = self.image_size

    @property
    def tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def patches_per_image(self) -> int:
        """S: vision-tower patches per image (before the 2 x 2 merge)."""
        return self.grid[1] * self.grid[2]

    @property
    def num_patches(self) -> int:
        return self.merged_grid[0] * self.merged_grid[1]

    def geometry(self) -> Geometry:
        return Geometry(num_patches=self.num_patches, num_layers=self.num_layers, has_cls=False)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    # ------------------------------------------------------------------ inputs
    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pixel_values` [n * S, 1176] as the processor writes them, with the fixed `image_grid_thw`."""
        n = self._image_count(pixels)
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([self.grid] * n, dtype=torch.long)}

    def prompt_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`mm_token_type_ids` for prompts with N placeholders per image, so the stock model computes its
        M-RoPE positions; compressed prompts go without (a compressed model computes its own)."""
        count = int((input_ids[0] == self.image_token_id).sum())
        if count == 0 or count % self.num_patches:
            return {}
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}

    def _image_count(self, pixels: torch.Tensor) -> int:
        s = self.patches_per_image
        if pixels.dim() != 2 or pixels.shape[1] != self.patch_dim or pixels.shape[0] % s or not len(pixels):
            h, w = self.image_size
            raise DuetError(
                f"pixel_values of shape {tuple(pixels.shape)} are not whole {h}x{w} images "
                f"([n x {s}, {self.patch_dim}]); this model takes one fixed resolution"
            )
        return pixels.shape[0] // s

    def check_grid(self, image_grid_thw: torch.Tensor | None, n_images: int) -> None:
        """A grid other than the fixed one means the processor resized to another resolution."""
        if image_grid_thw is None:
            return
        expected = torch.tensor([self.grid] * n_images, dtype=image_grid_thw.dtype)
        if image_grid_thw.shape != expected.shape or not bool((image_grid_thw.cpu() == expected).all()):
            h, w = self.image_size
            got = [tuple(int(x) for x in row) for row in image_grid_thw.reshape(-1, 3).tolist()]
            raise DuetError(
                f"image_grid_thw {got} is not {n_images} x {self.grid} ({h}x{w} px): this model takes one "
                "fixed resolution (load it with duet_export.load, whose processor resizes to it)"
            )

    # ------------------------------------------------------------------ vision side
    def vision_layer(
        self, pixel_values: torch.Tensor, need_scores: bool, score_grad: bool = False
    ) -> VisionLayerOutput:
        """The stock tower's computation on the fixed grid (same modules, same order), plus Stage 1's scores
        and keys from the last block. `hidden` is the merger's output with a zero "CLS" row in front."""
        tower = self.tower
        n = self._image_count(pixel_values)
        s, unit = self.patches_per_image, self.merge**2
        device = pixel_values.device
        window_index = self.window_index.to(device)

        def window_order(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n, s // unit, unit, -1)[:, window_index].reshape(n * s, -1)

        x = tower.patch_embed(pixel_values.to(tower.patch_embed.proj.weight.dtype))
        x = window_order(x)
        positions = self.vision_positions.to(device).repeat(n, 1)
        cos, sin = (window_order(f) for f in tower.rotary_pos_emb(x, positions))
        full = torch.arange(n + 1, device=device, dtype=torch.int32) * s
        ends = torch.tensor(self.window_lengths, device=device).cumsum(0)
        cu_window = torch.cat(
            [torch.zeros(1, device=device, dtype=torch.int32)]
            + [(ends + i * s).to(torch.int32) for i in range(n)]
        )
        scores = keys = None
        last = len(tower.blocks) - 1
        static = torch.onnx.is_in_onnx_export()
        for i, block in enumerate(tower.blocks):
            is_full = i in tower.fullatt_block_indexes
            if i == last and need_scores:
                with nullcontext() if score_grad else torch.no_grad():
                    scores, keys = self._received_attention(block, x, (cos, sin), n, is_full)
            if static:  # the stock attention splits by `cu_seqlens.tolist()`: data-dependent in a graph
                x = self._static_block(block, x, (cos, sin), [s] * n if is_full else self.window_lengths * n)
            else:
                x = block(x, cu_seqlens=full if is_full else cu_window, position_embeddings=(cos, sin))
        merged = tower.merger(x).reshape(n, s // unit, -1)[:, self.reverse_index.to(device)]
        hidden = torch.cat([merged.new_zeros(n, 1, merged.shape[-1]), merged], dim=1)
        if keys is not None:
            keys = torch.cat([keys.new_zeros(n, 1, keys.shape[-1]), keys], dim=1)
        return VisionLayerOutput(hidden=hidden, cls_attention=scores, keys=keys)

    @staticmethod
    def _static_block(
        block: nn.Module, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        """One vision block with its segments as constant slices (equal ones batched): for export.

        The same modules and arithmetic as the stock block (checked against it in the tests)."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        attn = block.attn
        total = x.shape[0]
        q, k, v = attn.qkv(block.norm1(x)).reshape(total, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
        if len(set(lengths)) == 1:
            seg = lengths[0]
            q, k, v = (t.reshape(total // seg, seg, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
            out = out.transpose(1, 2).reshape(total, -1)
        else:
            parts, start = [], 0
            for seg in lengths:
                qs, ks, vs = (t[start : start + seg].transpose(0, 1) for t in (q, k, v))
                parts.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=attn.scaling))
                start += seg
            out = torch.cat([p.transpose(0, 1) for p in parts]).reshape(total, -1)
        x = x + attn.proj(out)
        return x + block.mlp(block.norm2(x))

    def _received_attention(
        self, block: nn.Module, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], n: int, full: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, N] attention each merged token receives, [n, N, d] keys), both in raster order.

        Per patch: softmax(q k^T * scale) summed over all queries of its image (its window, if the block is
        windowed), mean over heads; then mean over each 2 x 2 merge unit. Keys are taken after the vision
        RoPE, averaged over the unit and the heads. Query rows go in chunks, so no S x S matrix per head.
        """
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        attn = block.attn
        s, unit = self.patches_per_image, self.merge**2
        q, k, _ = attn.qkv(block.norm1(x)).reshape(n * s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
        q = q.reshape(n, s, attn.num_heads, -1).transpose(1, 2).float()  # [n, h, S, d]
        k = k.reshape(n, s, attn.num_heads, -1).transpose(1, 2).float()
        segment = None
        if not full:
            lengths = torch.tensor(self.window_lengths, device=x.device)
            segment = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
        received = torch.zeros(n, attn.num_heads, s, device=x.device)
        chunk = max(1, min(s, (1 << 22) // max(1, s * attn.num_heads)))
        for start in range(0, s, chunk):
            logits = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * attn.scaling
            if segment is not None:
                same = segment[start : start + chunk, None] == segment[None]
                logits = logits.masked_fill(~same, torch.finfo(logits.dtype).min)
            received += torch.softmax(logits, dim=-1).sum(dim=2)
        reverse = self.reverse_index.to(x.device)
        scores = received.mean(dim=1).reshape(n, s // unit, unit).mean(-1)[:, reverse]
        keys = k.reshape(n, attn.num_heads, s // unit, unit, -1).mean(3)[:, :, reverse].mean(1)
        return scores, keys

    def uncompressed_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 1:]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # the merger (Qwen's projector) already ran: Stage 1 merges projected tokens

    def visual_features(
        self, pixel_values: torch.Tensor, config: DuetConfig, image_grid_thw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, V2VResult | None]:
        """Merged tokens per image [n, V, D] in raster order; with Stage 1, `V2VResult.kept` says which."""
        self.check_grid(image_grid_thw, self._image_count(pixel_values))
        out = self.vision_layer(pixel_values, need_scores=config.stage1)
        if not config.stage1:
            return self.uncompressed_tokens(out.hidden), None
        # The zero row stands in for CLS: `dominant + 1` then selects `dominant` real tokens.
        merged = v2v_merge(
            out.hidden,
            out.cls_attention,
            out.keys,
            config.dominant + 1,
            config.contextual,
            config.cluster_width,
        )
        tokens, kept = self._raster_order(merged.tokens, merged.dominant, merged.anchors)
        return tokens, V2VResult(
            tokens=tokens,
            dominant=merged.dominant,
            anchors=merged.anchors,
            members=merged.members,
            assignment=merged.assignment,
            kept=kept,
        )

    @staticmethod
    def _raster_order(
        tokens: torch.Tensor, dominant: torch.Tensor, anchors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`v2v_merge`'s [zero CLS, dominant..., contextual...] -> (tokens in patch order, their patches)."""
        chosen = torch.cat([dominant, anchors], dim=1)
        order = torch.sort(chosen, dim=1).indices
        return gather_rows(tokens[:, 1:], order), torch.gather(chosen, 1, order)

    def stage1_node(self, out: VisionLayerOutput, config: DuetConfig) -> tuple[torch.Tensor, ...]:
        """Export: the `duet.V2VMerge` node on the zero-CLS layout, then raster order (+ `stage1_kept`)."""
        from duet_export.stages.ops import v2v_merge_node

        tokens, dominant, anchors = v2v_merge_node(
            out.hidden,
            out.cls_attention,
            out.keys,
            config.dominant + 1,
            config.contextual,
            config.cluster_width,
        )
        tokens, kept = self._raster_order(tokens, dominant, anchors)
        return tokens, dominant, anchors, kept

    def export_pixels(self, images: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((images * self.patches_per_image, self.patch_dim), dtype=dtype)

    # ------------------------------------------------------------------ positions
    def _positions_refusal(self, chosen: str) -> str:
        return (
            f"{self.family} always keeps its M-RoPE (t, h, w) positions, as its reference does: "
            f"--positions {chosen} does not apply (leave it out, or give keep)"
        )

    def stage1_kept(self, stage1: V2VResult) -> torch.Tensor:
        return stage1.kept

    def positions(
        self,
        ids: torch.Tensor,
        pad: torch.Tensor,
        visual: torch.Tensor,
        kept: torch.Tensor | None,
        per_image: int | None = None,
    ) -> torch.Tensor:
        """[3, B, T] M-RoPE positions of the uncompressed prompt, for the tokens this prompt still holds.

        The same numbers as `get_rope_index` (left padding included) without its Python loops: a text
        token sits at (#real text tokens before it) + (images before it) * max(h', w'), image token (r, c)
        of a merged h' x w' grid at base + (0, r, c). `kept` maps each placeholder to its token. One image
        per prompt, so `per_image` (LLaVA's frame length) is not needed: `kept` has one row per prompt.
        """
        hm, wm = self.merged_grid
        big = max(hm, wm)
        b = ids.shape[0]
        vis = visual & pad
        count = vis.sum(dim=1)
        per_image = kept.shape[1] if kept is not None else self.num_patches
        checks = not torch.onnx.is_in_onnx_export()
        if checks and not bool((count == per_image).all()):
            raise DuetError(
                f"a compressed Qwen2.5-VL model takes exactly one image per prompt; a prompt holds "
                f"{int(count.min())} image tokens where one image gives {per_image}"
            )
        text = ~vis & pad
        before = text.long().cumsum(dim=1) - text.long()
        rank = (vis.long().cumsum(dim=1) - 1).clamp(min=0)
        if kept is None:
            cell = rank
        else:
            if checks and kept.shape[0] != b:
                raise DuetError(f"{kept.shape[0]} images for {b} prompts: give one image per prompt")
            cell = torch.gather(kept.to(ids.device), 1, rank.clamp(max=per_image - 1))
        done = (vis.long().cumsum(dim=1) >= per_image).long()  # the image is complete at this token
        base = torch.where(vis, before, before + done * big)
        rows = torch.where(vis, base + torch.div(cell, wm, rounding_mode="floor"), base)
        cols = torch.where(vis, base + cell % wm, base)
        return torch.stack([base, rows, cols]).masked_fill(~pad.unsqueeze(0), 0)

    def decode_position_offset(self, visual_tokens: int, keep: bool = True) -> int:
        """A generated token sits at (real tokens cached) + this: the uncompressed prompt's image spans
        max(h', w') positions, whatever number of its tokens a layer group still caches."""
        return max(self.merged_grid) - visual_tokens

    # ------------------------------------------------------------------ decoder side
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        merger = list(self.tower.merger.parameters())
        merger_ids = {id(p) for p in merger}
        llm, seen = [], set()
        for p in [*self._lm.parameters(), *self.model.lm_head.parameters()]:
            if id(p) not in seen:  # lm_head may be tied to embed_tokens
                seen.add(id(p))
                llm.append(p)
        return {
            "vision": [p for p in self.tower.parameters() if id(p) not in merger_ids],
            "projector": merger,
            "llm": llm,
        }
