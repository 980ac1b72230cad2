"""The compressed forward pass: Stage 1 on the image, Stage 2 between decoder layers, KV groups on decode.

`DuetForward` replaces `forward` on one model instance (see `duet_export.compress`), so `model(...)`,
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
from duet_export.stages.t2v import t2v_keep, t2v_scores
from duet_export.stages.v2v import V2VResult

__all__ = ["IGNORE_INDEX", "DuetForward", "DuetTrace", "causal_mask", "positions_from_mask"]

IGNORE_INDEX = -100


@dataclass
class DuetTrace:
    """What the stages kept in one prefill, for `inspect` and for tests. Pass one to the forward to fill it."""

    stage1: V2VResult | None = None
    # For each drop layer: [B, keep] positions kept, as indices into the visual tokens that entered the decoder
    # (i.e. into the Stage-1 output order).
    stage2: dict[int, torch.Tensor] = field(default_factory=dict)
    visual_tokens: int = 0
    # For each scored drop layer: the token ids of the queries of sample 0 (what Stage 2 listened to).
    query_ids: dict[int, list[int]] = field(default_factory=dict)


def positions_from_mask(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Positions 0..len-1 counted over real tokens only (padding gets 0), as `generate()` computes them."""
    if mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def causal_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """A [B, 1, q, kv] boolean mask (True = attend) for SDPA, or None where plain causal attention is right.

    Padding rows may attend to themselves so no row is fully masked (a fully masked row is NaN in SDPA and
    NaN values would leak into real rows through the zero-weighted value product).
    """
    if mask is None or bool(mask.all()):
        if q_len == 1 or q_len == kv_len:
            return None
        mask = torch.ones((1, kv_len), dtype=torch.bool, device=device)
    past = kv_len - q_len
    keys = torch.arange(kv_len, device=device)
    queries = torch.arange(q_len, device=device).unsqueeze(1) + past
    allowed = (keys <= queries).unsqueeze(0) & mask.bool().unsqueeze(1)
    allowed |= (keys == queries).unsqueeze(0)
    return allowed.unsqueeze(1)


def _gather_rows(x: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """x[b, index[b]] for [B, T] or [B, T, D] tensors."""
    if x is None:
        return None
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] column indices of the True entries of a [B, T] mask holding `count` per row, ascending."""
    return torch.nonzero(mask, as_tuple=False)[:, 1].view(mask.shape[0], count)


@dataclass
class _Sequence:
    """The prefill sequence as it shrinks: everything that must lose the same positions together."""

    ids: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor | None  # [B, T] padding mask, None when nothing is padded
    visual: torch.Tensor  # [B, T] bool
    labels: torch.Tensor | None
    query: torch.Tensor | None  # [B, T] int8: 1 salient prompt token, 0 other prompt token, -1 generated
    positions: torch.Tensor

    def keep(self, keep: torch.Tensor) -> _Sequence:
        count = int(keep[0].sum())
        index = _true_positions(keep, count)
        mask = _gather_rows(self.mask, index)
        b = keep.shape[0]
        return _Sequence(
            ids=_gather_rows(self.ids, index),
            hidden=_gather_rows(self.hidden, index),
            mask=mask,
            visual=_gather_rows(self.visual, index),
            labels=_gather_rows(self.labels, index),
            query=_gather_rows(self.query, index),
            positions=positions_from_mask(mask, b, count, keep.device),
        )


class DuetForward:
    """A drop-in `forward` for a model with DUET compression on. Created by `duet_export.compress`."""

    _warned_no_query_mask = False

    def __init__(self, model: torch.nn.Module, adapter: Adapter, config: DuetConfig) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config.validate(adapter.geometry())
        self.geometry = adapter.geometry()
        self.group_tokens = config.group_visual_tokens(self.geometry)
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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise DuetError("a compressed model needs input_ids (it locates the image tokens in them)")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = bool(getattr(self.adapter.text_config, "use_cache", True)) and not self.model.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.adapter.text_config)
        past = cache.get_seq_length(0) if cache is not None else 0
        if past == 0:
            hidden, labels = self._prefill(
                input_ids, pixel_values, attention_mask, labels, duet_query_mask, cache, use_cache, duet_trace
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
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # ----------------------------------------------------------------------------------- prefill
    def _prefill(self, input_ids, pixel_values, attention_mask, labels, query_mask, cache, use_cache, trace):
        b, t = input_ids.shape
        device = input_ids.device
        visual = input_ids == self.adapter.image_token_id
        mask = attention_mask.bool() if attention_mask is not None else None
        if mask is not None and bool(mask.all()):
            mask = None
        query_mask = self._extend_query_mask(query_mask, input_ids)
        if query_mask is not None:  # an image token the model generated is text, not a placeholder
            visual &= query_mask >= 0
        counts = visual.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise DuetError("every prompt in a batch must hold the same number of image tokens")
        per_sample = int(counts[0])
        hidden = self.adapter.embed(input_ids)
        if per_sample:
            if pixel_values is None:
                raise DuetError("the prompt holds image tokens but no pixel_values were given")
            features, stage1 = self.adapter.visual_features(pixel_values, self.config)
            if trace is not None:
                trace.stage1 = stage1
            seq = _Sequence(
                input_ids, hidden, mask, visual, labels, query_mask, positions_from_mask(mask, b, t, device)
            )
            seq = self._fit_image_tokens(seq, features, per_sample)
            flat = features.reshape(-1, features.shape[-1]).to(seq.hidden.dtype)
            seq.hidden = seq.hidden.masked_scatter(seq.visual.unsqueeze(-1), flat)
        else:
            seq = _Sequence(
                input_ids, hidden, mask, visual, labels, query_mask, positions_from_mask(mask, b, t, device)
            )
        if trace is not None:
            trace.visual_tokens = int(seq.visual[0].sum())
        for g, (start, end) in enumerate(self.groups):
            if g > 0:
                seq = self._drop(seq, start, self.group_tokens[g], trace)
            cos_sin = self.adapter.rotary(seq.hidden, seq.positions)
            length = seq.hidden.shape[1]
            mask4 = causal_mask(seq.mask, length, length, device)
            hidden_g = seq.hidden
            for layer in self.adapter.decoder_layers[start:end]:
                hidden_g = layer(
                    hidden_g,
                    attention_mask=mask4,
                    position_embeddings=cos_sin,
                    position_ids=seq.positions,
                    cache=cache if use_cache else None,
                    use_cache=use_cache,
                )
            seq.hidden = hidden_g
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
        b = seq.hidden.shape[0]
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
        return seq.keep(keep)

    def _queries(self, seq: _Sequence) -> torch.Tensor:
        """[B, T] bool: the text tokens that score the visual tokens at a drop layer (ALGORITHM.md, Stage 2)."""
        b, t = seq.visual.shape
        index = torch.arange(t, device=seq.visual.device).expand(b, -1)
        last_visual = torch.where(seq.visual, index, -1).max(dim=1, keepdim=True).values
        real = seq.mask if seq.mask is not None else torch.ones_like(seq.visual)
        if seq.query is not None:  # only the prompt's tokens may score (see _extend_query_mask)
            real = real & (seq.query >= 0)
        eligible = (index > last_visual) & real
        if seq.labels is not None:
            answer = seq.labels != IGNORE_INDEX
            eligible &= ~answer
            first_answer = torch.where(answer, index, t).min(dim=1, keepdim=True).values
            final = torch.where(eligible & (index < first_answer), index, -1).max(dim=1, keepdim=True).values
        else:
            final = torch.where(real, index, -1).max(dim=1, keepdim=True).values
        final_token = index == final
        mode = self.config.query
        if mode == "salient" and seq.query is None:
            if not DuetForward._warned_no_query_mask:
                warnings.warn(
                    "query=salient but no duet_query_mask was given (use duet_export.prepare_inputs): "
                    "scoring with all text after the image",
                    stacklevel=4,
                )
                DuetForward._warned_no_query_mask = True
            mode = "all"
        if mode == "all":
            chosen = eligible
        elif mode == "salient":
            chosen = eligible & (seq.query > 0)
        else:
            chosen = torch.zeros_like(eligible)
        chosen = chosen | final_token
        # A prompt with no text after the image still needs one query: its last real token.
        empty = ~chosen.any(dim=1, keepdim=True)
        last_real = index == torch.where(real, index, -1).max(dim=1, keepdim=True).values
        return chosen | (empty & last_real)

    @torch.no_grad()
    def _scores(self, seq: _Sequence, layer_index: int, visual_index: torch.Tensor, trace) -> torch.Tensor:
        parts = self.adapter.attention_parts(self.adapter.decoder_layers[layer_index])
        queries = self._queries(seq)
        if trace is not None:
            trace.query_ids[layer_index] = seq.ids[0][queries[0]].tolist()
        b, t = queries.shape
        count = queries.sum(dim=1)
        q_max = int(count.max())
        q_index = torch.argsort((~queries).int(), dim=1, stable=True)[:, :q_max]
        q_valid = torch.arange(q_max, device=q_index.device).unsqueeze(0) < count.unsqueeze(1)
        normed = parts.input_norm(seq.hidden)
        q = (
            parts.q_proj(_gather_rows(normed, q_index))
            .view(b, q_max, parts.num_heads, parts.head_dim)
            .transpose(1, 2)
        )
        k = parts.k_proj(normed).view(b, t, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        cos, sin = self.adapter.rotary(seq.hidden, seq.positions)
        q = self.adapter.apply_rotary(q, _gather_rows(cos, q_index), _gather_rows(sin, q_index))
        k = self.adapter.apply_rotary(k, cos, sin)
        keys = torch.arange(t, device=q_index.device)
        allowed = keys.view(1, 1, t) <= q_index.unsqueeze(-1)
        if seq.mask is not None:
            allowed &= seq.mask.unsqueeze(1)
        return t2v_scores(q, k, allowed, q_valid, visual_index, parts.scale)

    def _drop(self, seq: _Sequence, layer_index: int, keep: int, trace: DuetTrace | None) -> _Sequence:
        b = seq.visual.shape[0]
        current = int(seq.visual[0].sum())
        if keep >= current:
            return seq
        visual_index = _true_positions(seq.visual, current)
        if keep > 0:
            kept = t2v_keep(self._scores(seq, layer_index, visual_index, trace), keep)
            kept_positions = torch.gather(visual_index, 1, kept)
        else:
            kept = visual_index.new_zeros((b, 0))
            kept_positions = kept
        if trace is not None:
            # Map positions within the current block back to the Stage-1 output order.
            previous = [*trace.stage2.values()]
            origin = previous[-1] if previous else torch.arange(current, device=kept.device).expand(b, -1)
            trace.stage2[layer_index] = torch.gather(origin, 1, kept)
        keep_mask = ~seq.visual
        keep_mask = keep_mask.scatter(1, kept_positions, True)
        return seq.keep(keep_mask)

    # ----------------------------------------------------------------------------------- decode
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        """New tokens after the prompt: each layer group uses its own cache length for positions and mask."""
        b, q = input_ids.shape
        device = input_ids.device
        hidden = self.adapter.embed(input_ids)
        steps = torch.arange(q, device=device)
        for start, end in self.groups:
            cached = cache.get_seq_length(start)
            if attention_mask is None:
                positions = (cached + steps).unsqueeze(0).expand(b, -1)
                mask = None
            else:
                pads = attention_mask.shape[1] - attention_mask.long().sum(dim=1, keepdim=True)
                positions = cached - pads + steps.unsqueeze(0)
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
