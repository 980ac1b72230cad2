"""Slow, obviously-correct loop implementations of ALGORITHM.md, to check the vectorised stages against."""

from __future__ import annotations

import math

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
