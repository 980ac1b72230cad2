"""Slow, obviously-correct loop implementations of ALGORITHM.md, to check the vectorised stages against."""

from __future__ import annotations

import math
import sys

import torch


def ranked(scores: list[float]) -> list[int]:
    """Indices by score descending, lower index first among equal scores."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def loop_v2v(hidden, cls_attention, keys, dominant: int, contextual: int, width: int):
    """Stage 1 for one image: returns (tokens [K_d+K_c, D], dominant, anchors, members, assignment)."""
    n = cls_attention.shape[0]
    s = cls_attention.tolist()
    order = ranked(s)
    dom = sorted(order[: dominant - 1])
    rest = order[dominant - 1 :]
    tokens = [hidden[0]] + [hidden[1 + p] for p in dom]
    anchors, members, assignment = [], [], []
    if contextual > 0:
        m = n - (dominant - 1)
        pool_size = min(max(1, width * contextual), m)
        pool = rest[:pool_size]
        step = max(1, pool_size // contextual)
        anchor_pos = [i * step for i in range(contextual)]
        anchors = [pool[i] for i in anchor_pos]
        members = [pool[i] for i in range(pool_size) if i not in anchor_pos]

        def unit(p):
            v = keys[1 + p].double()
            return v / max(float(v.norm()), 1e-12)

        groups = {a: [] for a in range(contextual)}
        for p in members:
            sims = [float(unit(p) @ unit(a)) for a in anchors]
            best = max(range(contextual), key=lambda i: (sims[i], -i))
            assignment.append(best)
            groups[best].append(p)
        for i, a in enumerate(anchors):
            tok = hidden[1 + a].double().clone()
            if groups[i]:
                tok += sum(hidden[1 + p].double() for p in groups[i]) / len(groups[i])
            tokens.append(tok.to(hidden.dtype))
    return torch.stack(tokens), dom, anchors, members, assignment


def loop_t2v_scores(queries, keys, allowed, query_valid, visual_index, scale):
    """Stage 2 scores for one sample: queries [H, Q, d], keys [Hkv, T, d], allowed [Q, T]."""
    heads, kv_heads = queries.shape[0], keys.shape[0]
    group = heads // kv_heads
    q_rows = [i for i in range(queries.shape[1]) if query_valid[i]]
    scores = []
    for v in visual_index.tolist():
        total = 0.0
        for i in q_rows:
            per_head = 0.0
            for h in range(heads):
                logits = [
                    float(queries[h, i].double() @ keys[h // group, j].double()) * scale
                    for j in range(keys.shape[1])
                    if allowed[i, j]
                ]
                cols = [j for j in range(keys.shape[1]) if allowed[i, j]]
                top = max(logits)
                denom = sum(math.exp(x - top) for x in logits)
                p = math.exp(logits[cols.index(v)] - top) / denom if v in cols else 0.0
                per_head += p
            total += per_head / heads
        scores.append(total / len(q_rows))
    return scores


# ------------------------------------------------------------------------------------------------------------
# Whole-model oracles: the stock transformers modules run one sample at a time, and the two stages written as
# loops over their outputs (ALGORITHM.md). Nothing here calls duet_export's stages, adapters or forward; only
# its loader, for a fresh stock model instance.

ORACLE_ATTENTION = "duet_oracle_eager"


class AttentionRecorder:
    """The stock eager attention of each module's own modeling file, keeping every call's probabilities
    [B, H, q, k] and keys [B, H, k, d] (rotary applied, as the module hands them over)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        self.calls.append((module, weights.detach(), key.detach()))
        return out, weights

    def of(self, module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(w, k) for m, w, k in self.calls if m is module]


RECORDER = AttentionRecorder()


def oracle_model(path) -> torch.nn.Module:
    """A fresh copy of the checkpoint at `path` whose every attention is the recording stock eager one."""
    from transformers import AttentionInterface

    from duet_export.loading import load

    AttentionInterface.register(ORACLE_ATTENTION, RECORDER)
    model = load(path).model
    model.set_attn_implementation(ORACLE_ATTENTION)
    return model.eval()


def ranked_with_margin(scores: list[float], keep: int, what: str) -> list[int]:
    """`ranked(scores)[:keep]`, refusing a cut so close that float32 rounding could decide it."""
    order = ranked(scores)
    if 0 < keep < len(scores):
        above, below = scores[order[keep - 1]], scores[order[keep]]
        assert above - below > 1e-5 * max(abs(above), 1e-6), (
            f"{what}: the cut is a near-tie ({above}, {below})"
        )
    return order[:keep]


def loop_v2v_patches(
    tokens: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int, width: int
) -> tuple[list[int], torch.Tensor]:
    """Stage 1 without CLS (Qwen2.5-VL): `dominant` counts patches. Returns (kept patches ascending, tokens
    in that order, each contextual token in its anchor's slot)."""
    zero = tokens.new_zeros(1, tokens.shape[-1])
    ranked_with_margin(scores.tolist(), dominant, "Stage 1 dominant")
    merged, dom, anchors, _, _ = loop_v2v(
        torch.cat([zero, tokens]),
        scores,
        torch.cat([keys.new_zeros(1, keys.shape[-1]), keys]),
        dominant + 1,
        contextual,
        width,
    )
    kept = dom + anchors
    order = sorted(range(len(kept)), key=lambda i: kept[i])
    return [kept[i] for i in order], merged[1:][order]


def stock_clip_stage1_inputs(
    tower: torch.nn.Module, pixel_values: torch.Tensor, feature_layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [n, 1+N, D], CLS attention summed over heads [n, N], head-mean keys [n, 1+N, d]) of the
    feature layer, read from the stock CLIP tower's own forward (recording eager attention)."""
    RECORDER.calls.clear()
    out = tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[feature_layer]
    layer = tower.encoder.layers[len(out.hidden_states) + feature_layer - 1]  # the layer that wrote `hidden`
    ((weights, keys),) = RECORDER.of(layer.self_attn)
    RECORDER.calls.clear()
    return hidden, weights[:, :, 0, 1:].sum(dim=1), keys.mean(dim=1)


def stock_qwen_stage1(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    dominant: int,
    contextual: int,
    width: int,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Qwen2.5-VL Stage 1 per image from the stock vision tower: ([kept patches], [tokens [V, D]]).

    Score of a merged token = attention its four patches receive in the last block (softmax rows of the
    recording stock attention, mean over heads, summed over all queries of their segment), averaged over the
    2 x 2 unit; key = the last block's rotary keys averaged over heads and the unit. The tower works in window
    order: each window-order row is mapped back to its patch by matching it with the patch embeddings.
    """
    tower = model.model.visual
    seen: dict[str, torch.Tensor] = {}

    def patches(module, args, out) -> None:
        seen["patches"] = out

    def window(module, args) -> None:
        seen["window"] = args[0]

    hooks = [
        tower.patch_embed.register_forward_hook(patches),
        tower.blocks[0].register_forward_pre_hook(window),
    ]
    RECORDER.calls.clear()
    try:
        merged = tower(pixel_values, grid_thw=grid_thw).pooler_output
    finally:
        for hook in hooks:
            hook.remove()
    row_of = {bytes(r.numpy().tobytes()): i for i, r in enumerate(seen["patches"])}
    patch_of_window_row = [row_of[bytes(r.numpy().tobytes())] for r in seen["window"]]
    assert sorted(patch_of_window_row) == list(range(len(patch_of_window_row)))
    received: list[float] = []
    keys: list[torch.Tensor] = []
    for weights, key in RECORDER.of(tower.blocks[-1].attn):  # one call per attention segment, in order
        heads = weights.shape[1]
        for j in range(weights.shape[-1]):
            received.append(sum(float(weights[0, h, :, j].sum()) for h in range(heads)) / heads)
            keys.append(key[0, :, j].mean(dim=0))
    RECORDER.calls.clear()
    by_patch = [0.0] * len(received)
    key_by_patch = [None] * len(received)
    for row, patch in enumerate(patch_of_window_row):
        by_patch[patch], key_by_patch[patch] = received[row], keys[row]
    unit = tower.spatial_merge_size**2
    images = int(grid_thw.shape[0])
    per_image = len(by_patch) // images
    out_kept, out_tokens = [], []
    for b in range(images):
        base = b * per_image
        cells = range(per_image // unit)
        scores = torch.tensor([sum(by_patch[base + unit * u + r] for r in range(unit)) / unit for u in cells])
        unit_keys = torch.stack(
            [sum(key_by_patch[base + unit * u + r] for r in range(unit)) / unit for u in cells]
        )
        tokens = merged[b * len(cells) : (b + 1) * len(cells)]
        kept, kept_tokens = loop_v2v_patches(tokens, scores, unit_keys, dominant, contextual, width)
        out_kept.append(kept)
        out_tokens.append(kept_tokens)
    return out_kept, out_tokens


def select_loop_queries(
    visual: list[bool], salient: list[bool], labels: list[int] | None, mode: str
) -> list[int]:
    """Stage 2's query rows of one unpadded sample (ALGORITHM.md): text after the visual block; with labels,
    only label-ignored tokens, and the final prompt token is the one before the first answer."""
    t = len(visual)
    last_visual = max(i for i in range(t) if visual[i])
    after = [i for i in range(last_visual + 1, t) if labels is None or labels[i] == -100]
    if labels is None:
        final = t - 1
    else:
        first_answer = min(i for i in range(t) if labels[i] != -100)
        final = max(i for i in after if i < first_answer)
    chosen = {"all": after, "salient": [i for i in after if salient[i]], "last": []}[mode]
    return sorted(set(chosen) | {final})


def loop_decoder(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    visual,
    salient,
    schedule: dict[int, int],
    mode: str,
    *,
    recompact: bool,
    labels: list[int] | None = None,
) -> tuple[dict[int, list[int]], torch.Tensor, list[int] | None]:
    """Run the stock decoder layers on one unpadded sample with Stage-2 drops before the layers in `schedule`
    ({layer: tokens kept}). `positions` is [T] (re-compacted after a drop when `recompact`) or [3, T] M-RoPE
    (kept as they are). Returns ({layer: kept visual indices in entering order}, logits, labels that stayed).

    Scores are read from the layer's own stock attention probabilities (recording eager attention) over the
    un-dropped sequence: mean over heads and the query rows, one score per visual token.
    """
    lm = model.model.language_model
    h = embeds.unsqueeze(0)
    visual, salient = [bool(x) for x in visual], [bool(x) for x in salient]
    labels = None if labels is None else list(labels)
    origin = list(range(sum(visual)))  # Stage-1 index of each visual token still present
    pos = positions
    kept_per_layer = {}

    def rotary(hidden, p):
        return lm.rotary_emb(hidden, p.view(3, 1, -1) if p.dim() == 2 else p.view(1, -1))

    def causal(t: int):
        allowed = torch.ones(t, t, dtype=torch.bool).tril()
        return torch.zeros(1, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)

    for li, layer in enumerate(lm.layers):
        t = h.shape[1]
        if li in schedule:
            _, weights = layer.self_attn(
                hidden_states=layer.input_layernorm(h),
                position_embeddings=rotary(h, pos),
                attention_mask=causal(t),
            )
            rows = select_loop_queries(visual, salient, labels, mode)
            columns = [i for i in range(t) if visual[i]]
            heads = weights.shape[1]
            scores = [
                sum(float(weights[0, hd, q, v]) for hd in range(heads) for q in rows) / (heads * len(rows))
                for v in columns
            ]
            chosen = sorted(ranked_with_margin(scores, schedule[li], f"Stage 2 before layer {li}"))
            kept_per_layer[li] = origin = [origin[c] for c in chosen]
            stay = sorted([i for i in range(t) if not visual[i]] + [columns[c] for c in chosen])
            h = h[:, stay]
            visual = [visual[i] for i in stay]
            salient = [salient[i] for i in stay]
            labels = None if labels is None else [labels[i] for i in stay]
            pos = torch.arange(len(stay)) if recompact else pos[..., stay]
        h = layer(
            h,
            attention_mask=causal(h.shape[1]),
            position_embeddings=rotary(h, pos),
            position_ids=pos.view(1, -1) if pos.dim() == 1 else None,
        )
    RECORDER.calls.clear()  # the probabilities were read from `self_attn`'s return value
    logits = model.lm_head(lm.norm(h))[0]
    return kept_per_layer, logits, labels
