"""The compressed forward pass: Stage 1 on the image, Stage 2 between decoder layers, KV groups on decode.

`DuetForward` replaces `forward` on one model instance (see `duet_export.compression`), so `model(...)`,
`model.generate(...)` and the HF Trainer all run through it. It reuses the model's own modules (vision
tower layers, projector, decoder layers, norms, rotary embedding) and only decides which tokens flow.

Nothing about a generation is stored on the model: on a decode step everything is derived from the KV cache
(each layer's cache length says how many tokens its group kept) and the attention mask `generate()` keeps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from duet_export.config import DuetConfig
from duet_export.errors import DuetError
from duet_export.models.base import Adapter
from duet_export.stages.ops import t2v_drop_node
from duet_export.stages.t2v import IGNORE_INDEX, compact, gather_rows
from duet_export.stages.v2v import V2VResult

__all__ = ["IGNORE_INDEX", "DuetForward", "DuetTrace", "causal_mask", "positions_from_mask", "scatter_visual"]


@dataclass
class DuetTrace:
    """What the stages kept in one prefill, for `inspect` and for tests. Pass one to the forward to fill it."""

    stage1: V2VResult | None = None
    # For each drop layer: [B, keep] positions kept, as indices into the visual tokens that entered the decoder
    # (i.e. into the Stage-1 output order).
    stage2: dict[int, torch.Tensor] = field(default_factory=dict)
    visual_tokens: int = 0
    # For each drop layer: [B, T_new] sequence positions that stayed (what the ONNX graph outputs too).
    keep_index: dict[int, torch.Tensor] = field(default_factory=dict)


def positions_from_mask(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Positions 0..len-1 counted over real tokens only (padding gets 0), as `generate()` computes them."""
    if mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def causal_mask(
    mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    device,
    static: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """A [B, 1, q, kv] boolean mask (True = attend) for SDPA, or None where plain causal attention is right.

    Padding rows may attend to themselves so no row is fully masked (a fully masked row is NaN in SDPA and
    NaN values would leak into real rows through the zero-weighted value product). `static=True` (export)
    always builds the mask, so nothing depends on the data.
    """
    if not static and (mask is None or bool(mask.all())):
        if q_len == 1 or q_len == kv_len:
            return None
        mask = torch.ones((1, kv_len), dtype=torch.bool, device=device)
    past = kv_len - q_len
    keys = torch.arange(kv_len, device=device)
    queries = torch.arange(q_len, device=device).unsqueeze(1) + past
    allowed = (keys <= queries).unsqueeze(0) & mask.bool().unsqueeze(1)
    allowed |= (keys == queries).unsqueeze(0)
    if static:
        # Exported graphs get an additive float mask: SDPA then lowers to Add + Softmax, where a boolean
        # mask costs a Where and a NaN guard on every [B, H, q, kv] score tensor (a quarter of prefill time).
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), blocked).unsqueeze(1)
    return allowed.unsqueeze(1)


def scatter_visual(hidden: torch.Tensor, visual: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Put the i-th visual feature of each row at the row's i-th image placeholder (static shapes)."""
    rank = (visual.long().cumsum(dim=1) - 1).clamp(min=0)
    return torch.where(visual.unsqueeze(-1), gather_rows(features.to(hidden.dtype), rank), hidden)


@dataclass
class _Sequence:
    """The prefill sequence as it shrinks: everything that must lose the same positions together."""

    ids: torch.Tensor
    hidden: torch.Tensor
    pad: torch.Tensor  # [B, T] bool, False on padding
    visual: torch.Tensor  # [B, T] bool
    labels: torch.Tensor | None
    query: torch.Tensor | None  # [B, T] int8: 1 salient prompt token, 0 other prompt token, -1 generated
    positions: torch.Tensor  # [B, T], or [3, B, T] for M-RoPE
    recompact: bool = True  # False: tokens keep their positions when others are removed

    def gather(self, index: torch.Tensor) -> _Sequence:
        pad = gather_rows(self.pad, index)
        b, t = index.shape
        if self.recompact:
            positions = positions_from_mask(pad, b, t, index.device)
        elif self.positions.dim() == 3:
            positions = torch.stack([gather_rows(p, index) for p in self.positions])
        else:
            positions = gather_rows(self.positions, index)
        return _Sequence(
            ids=gather_rows(self.ids, index),
            hidden=gather_rows(self.hidden, index),
            pad=pad,
            visual=gather_rows(self.visual, index),
            labels=gather_rows(self.labels, index),
            query=gather_rows(self.query, index),
            positions=positions,
            recompact=self.recompact,
        )

    @property
    def real(self) -> torch.Tensor:
        """Tokens that may query: not padding and part of the prompt."""
        return self.pad if self.query is None else self.pad & (self.query >= 0)


class DuetForward:
    """A drop-in `forward` for a model with DUET compression on. Created by `duet_export.compression`."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter, config: DuetConfig) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config.validate(adapter.geometry())
        self.keep = adapter.keeps_positions(config)  # kept tokens keep their places (docs/positions.md)
        self.geometry = adapter.geometry()
        self.group_tokens = config.group_visual_tokens(self.geometry)
        # Visual tokens each layer group caches per prompt (a video frame without Stage 1 keeps its CLS).
        self.cached_visual = [adapter.tokens_per_image(config) * self.geometry.frames, *self.group_tokens[1:]]
        self.groups = config.group_bounds(self.geometry.num_layers)

    def __repr__(self) -> str:
        return f"DuetForward({self.config.describe()})"

    # ----------------------------------------------------------------------------------- entry point
    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        duet_query_mask: torch.Tensor | None = None,
        duet_trace: DuetTrace | None = None,
        past_key_values: DynamicCache | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # Named so `generate()` forwards them: Qwen2.5-VL's grid (checked against the fixed resolution) and
        # token types (its stock M-RoPE input, unused: the adapter computes the positions).
        given = {"image_grid_thw": image_grid_thw}
        visual_inputs = {k: given[k] for k in self.adapter.visual_input_names if given.get(k) is not None}
        if input_ids is None or inputs_embeds is not None:
            raise DuetError("a compressed model needs input_ids (it locates the image tokens in them)")
        cache = cache if cache is not None else past_key_values
        if pixel_values_videos is not None:  # [B, F, 3, H, W]: a clip's frames are images to Stage 1
            pixel_values = pixel_values_videos.flatten(0, 1)
        if use_cache is None:
            use_cache = bool(getattr(self.adapter.text_config, "use_cache", True)) and not self.model.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.adapter.text_config)
        past = cache.get_seq_length(0) if cache is not None else 0
        if past == 0:
            hidden, labels = self._prefill(
                input_ids,
                pixel_values,
                attention_mask,
                labels,
                duet_query_mask,
                cache if use_cache else None,
                duet_trace,
                visual_inputs,
            )
        else:
            if pixel_values is not None:
                raise DuetError("images can only be given with the prompt, not on a decode step")
            hidden = self._decode(input_ids, attention_mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.adapter.lm_head(self.adapter.final_norm(hidden))
        loss = None
        if labels is not None:
            # num_items_in_batch: the HF Trainer's token count across gradient-accumulation steps.
            loss = self.model.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=logits.shape[-1],
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # ----------------------------------------------------------------------------------- prefill
    def _prefill(
        self, input_ids, pixel_values, attention_mask, labels, query_mask, cache, trace, visual_inputs
    ):
        """Check and normalise eager inputs, then run the shared (export-safe) prefill."""
        b, t = input_ids.shape
        pad = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        query = self._extend_query_mask(query_mask, input_ids)
        if query is None and self.config.query == "salient" and self.config.stage2:
            warnings.warn(
                "query=salient but no duet_query_mask was given (build inputs with duet_export.prepare_inputs): "
                "Stage 2 scores with all text after the image",
                stacklevel=3,
            )
        visual = input_ids == self.adapter.image_token_id
        if query is not None:  # an image token the model generated is text, not a placeholder
            visual &= query >= 0
        counts = visual.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise DuetError("every prompt in a batch must hold the same number of image tokens")
        seq = _Sequence(
            input_ids,
            None,
            pad,
            visual,
            labels,
            query,
            positions_from_mask(pad, b, t, input_ids.device),
            not self.keep,
        )
        features = stage1 = None
        if int(counts[0]):
            if pixel_values is None:
                raise DuetError("the prompt holds image tokens but no pixel_values were given")
            features, stage1 = self.adapter.visual_features(pixel_values, self.config, **visual_inputs)
            if trace is not None:
                trace.stage1 = stage1
            seq = self._fit_image_tokens(seq, features, int(counts[0]))
            features = features.reshape(b, -1, features.shape[-1])
        if self.keep:
            kept = self.adapter.stage1_kept(stage1) if stage1 is not None else None
            per_image = self.adapter.tokens_per_image(self.config)
            seq.positions = self.adapter.positions(seq.ids, seq.pad, seq.visual, kept, per_image)
            if self.config.enabled and features is not None and features.shape[1] != self.cached_visual[0]:
                raise DuetError(
                    "positions=keep takes one image (or clip) per prompt (a decode step could not tell how "
                    "many uncompressed image tokens came before it): use positions=compact for several"
                )
        seq.hidden = self.adapter.embed(seq.ids)
        return self.prefill(seq, features, cache, trace, static=False)

    def prefill(
        self, seq: _Sequence, features: torch.Tensor | None, cache, trace: DuetTrace | None, static: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visual features in, decoder with Stage-2 drops, final hidden states out.

        With `static=True` (ONNX export) nothing depends on the data: counts come from the config, masks are
        always explicit, and the stages become `duet` nodes.
        """
        if features is not None:
            seq.hidden = scatter_visual(seq.hidden, seq.visual, features)
        visual_count = features.shape[1] if features is not None else 0
        if trace is not None:
            trace.visual_tokens = visual_count
        for g, (start, end) in enumerate(self.groups):
            if g > 0 and visual_count:
                seq, visual_count = self._drop(seq, start, visual_count, self.group_tokens[g], trace, static)
            cos_sin = self.adapter.rotary(seq.hidden, seq.positions)
            length = seq.hidden.shape[1]
            mask4 = causal_mask(
                seq.pad, length, length, seq.hidden.device, static=static, dtype=seq.hidden.dtype
            )
            hidden = seq.hidden
            for layer in self.adapter.decoder_layers[start:end]:
                hidden = layer(
                    hidden,
                    attention_mask=mask4,
                    position_embeddings=cos_sin,
                    # M-RoPE [3, B, T] positions live in cos_sin; layers take [B, T] ones only.
                    position_ids=seq.positions if seq.positions.dim() == 2 else None,
                    cache=cache,
                    use_cache=cache is not None,
                )
            seq.hidden = hidden
        return seq.hidden, seq.labels

    @staticmethod
    def _extend_query_mask(query_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The salient mask covers the prompt. Without a KV cache, `generate()` re-runs the prompt plus the
        tokens generated so far: those are marked -1 (not prompt), so Stage 2 scores with the prompt's own
        queries at every step, exactly as the cached prefill did."""
        if query_mask is None:
            return None
        b, t = input_ids.shape
        if query_mask.shape[0] != b or query_mask.shape[1] > t:
            raise DuetError(f"duet_query_mask has shape {tuple(query_mask.shape)}, input_ids {(b, t)}")
        out = torch.full((b, t), -1, dtype=torch.int8, device=input_ids.device)
        out[:, : query_mask.shape[1]] = query_mask.to(torch.int8)
        return out

    def _fit_image_tokens(self, seq: _Sequence, features: torch.Tensor, per_sample: int) -> _Sequence:
        """Make each image's placeholder run as long as its Stage-1 output.

        Prompts from `duet_export.prepare_inputs` already hold V tokens per image; prompts straight from the
        checkpoint's processor hold N, and the surplus placeholders are removed here.
        """
        b = seq.ids.shape[0]
        n_images, v_img = features.shape[0], features.shape[1]
        if n_images % b:
            raise DuetError(f"{n_images} images for {b} prompts: give every prompt the same number of images")
        per_image = per_sample // max(1, n_images // b)
        if per_image * (n_images // b) != per_sample:
            raise DuetError(
                f"{per_sample} image tokens cannot be split over {n_images // b} images per prompt"
            )
        if per_image == v_img:
            return seq
        if per_image != self.adapter.uncompressed_tokens_per_image or v_img > per_image:
            raise DuetError(
                f"the prompt holds {per_image} image tokens per image; expected {v_img} "
                f"(compressed) or {self.adapter.uncompressed_tokens_per_image} (as the processor writes them)"
            )
        rank = seq.visual.long().cumsum(dim=1) - 1
        keep = ~seq.visual | (rank % per_image < v_img)
        return seq.gather(compact(keep, seq.ids.shape[1] - (per_image - v_img) * (n_images // b)))

    def _drop(
        self,
        seq: _Sequence,
        layer_index: int,
        current: int,
        keep: int,
        trace: DuetTrace | None,
        static: bool = False,
    ) -> tuple[_Sequence, int]:
        """Stage 2 before decoder layer `layer_index`: keep `keep` of the `current` visual tokens.

        A drop that keeps every token still runs (and is traced) in PyTorch, so a keep ratio of 1.0 goes
        through the same code as any other; an exported graph leaves it out (the bundle names only the drops
        that remove tokens)."""
        if keep >= current and static:
            return seq, current
        parts = self.adapter.attention_parts(self.adapter.decoder_layers[layer_index])
        with torch.no_grad():
            normed = parts.input_norm(seq.hidden)
            cos, sin = self.adapter.rotary(seq.hidden, seq.positions)
            index = t2v_drop_node(
                normed, parts.q_proj.weight, parts.q_proj.bias, parts.k_proj.weight, parts.k_proj.bias,
                cos, sin, seq.real, seq.visual, None if seq.query is None else seq.query > 0,
                num_heads=parts.num_heads, num_kv_heads=parts.num_kv_heads, head_dim=parts.head_dim,
                scale=parts.scale, visual_tokens=current, keep=keep, mode=self.config.query, layer=layer_index,
                labels=seq.labels, pad=seq.pad,
            )  # fmt: skip
        if trace is not None:
            trace.keep_index[layer_index] = index
            if not torch.onnx.is_in_onnx_export():
                self._trace_kept(trace, seq, index, layer_index, keep)
        return seq.gather(index), keep

    @staticmethod
    def _trace_kept(
        trace: DuetTrace, seq: _Sequence, index: torch.Tensor, layer_index: int, keep: int
    ) -> None:
        """Record the kept visual tokens as indices into the Stage-1 output order."""
        block = seq.visual.long().cumsum(dim=1) - 1
        kept_visual = compact(gather_rows(seq.visual, index), keep)
        kept = torch.gather(gather_rows(block, index), 1, kept_visual)
        previous = list(trace.stage2.values())
        if previous:
            kept = torch.gather(previous[-1], 1, kept)
        trace.stage2[layer_index] = kept

    # ----------------------------------------------------------------------------------- decode
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        """New tokens after the prompt: each layer group uses its own cache length for positions and mask."""
        b, q = input_ids.shape
        device = input_ids.device
        hidden = self.adapter.embed(input_ids)
        steps = torch.arange(q, device=device)
        for g, (start, end) in enumerate(self.groups):
            cached = cache.get_seq_length(start)
            offset = self.adapter.decode_position_offset(self.cached_visual[g], self.keep)
            if attention_mask is None:
                positions = (cached + offset + steps).unsqueeze(0).expand(b, -1)
                mask = None
            else:
                pads = attention_mask.shape[1] - attention_mask.long().sum(dim=1, keepdim=True)
                positions = cached - pads + offset + steps.unsqueeze(0)
                # Left padding: removing dropped (real) tokens leaves the mask's prefix of this length.
                mask = attention_mask[:, : cached + q].bool()
            cos_sin = self.adapter.rotary(hidden, positions)
            mask4 = causal_mask(mask, q, cached + q, device)
            for layer in self.adapter.decoder_layers[start:end]:
                hidden = layer(
                    hidden,
                    attention_mask=mask4,
                    position_embeddings=cos_sin,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                )
        return hidden
