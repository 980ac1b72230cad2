"""Stage 2 inside the real decoder, against a per-sample loop built from the stock modules (ALGORITHM.md)."""

import sys

import pytest
import torch

from duet_export.config import DuetConfig
from duet_export.forward import DuetForward, DuetTrace
from duet_export.inputs import prepare_inputs

from loops import loop_v2v, ranked


def _loop_reference(tiny, inputs, config):
    """Batch-1, unpadded reference: Stage 1 by loop, decoder run layer by layer, drops scored by loops."""
    model, adapter = tiny.model, tiny.adapter
    lm = model.model.language_model
    llama = sys.modules[type(lm.layers[0].self_attn).__module__]
    ids = inputs["input_ids"][0]
    query_mask = inputs["duet_query_mask"][0]
    out = adapter.vision_layer(inputs["pixel_values"], need_scores=True)
    tokens, *_ = loop_v2v(
        out.hidden[0],
        out.cls_attention[0],
        out.keys[0],
        config.dominant,
        config.contextual,
        config.cluster_width,
    )
    features = adapter.project(tokens.unsqueeze(0))[0]
    visual = ids == adapter.image_token_id
    h = lm.embed_tokens(ids).clone()
    h[visual] = features
    origin = list(range(int(visual.sum())))  # Stage-1 order of the visual tokens still present
    kept_per_layer = {}
    v = len(origin)
    for li, layer in enumerate(lm.layers):
        if li in config.drop_layers:
            keep = int(config.keep_ratios[config.drop_layers.index(li)] * v + 1e-9)
            t = h.shape[0]
            vis_pos = [i for i in range(t) if visual[i]]
            last_vis = max(vis_pos)
            queries = [i for i in range(last_vis + 1, t) if query_mask[i]]
            if t - 1 not in queries:
                queries.append(t - 1)
            attn = layer.self_attn
            x = layer.input_layernorm(h.unsqueeze(0))
            pos = torch.arange(t).unsqueeze(0)
            cos, sin = lm.rotary_emb(x, pos)
            q = attn.q_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
            q, k = llama.apply_rotary_pos_emb(q, k, cos, sin)
            heads, group = q.shape[1], q.shape[1] // k.shape[1]
            scores = []
            for vp in vis_pos:
                total = 0.0
                for qi in queries:
                    for hd in range(heads):
                        logits = (k[0, hd // group, : qi + 1] @ q[0, hd, qi]) * attn.scaling
                        total += float(torch.softmax(logits.double(), dim=0)[vp]) / heads
                scores.append(total / len(queries))
            chosen = sorted(ranked(scores)[:keep])
            kept_per_layer[li] = [origin[c] for c in chosen]
            origin = kept_per_layer[li]
            keep_rows = [i for i in range(t) if not visual[i]] + [vis_pos[c] for c in chosen]
            keep_rows.sort()
            h, visual, query_mask = h[keep_rows], visual[keep_rows], query_mask[keep_rows]
        pos = torch.arange(h.shape[0]).unsqueeze(0)
        h = layer(
            h.unsqueeze(0), attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos
        )[0]
    logits = model.lm_head(lm.norm(h))
    return kept_per_layer, logits


CONFIGS = [
    DuetConfig(dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25)),
    DuetConfig(
        dominant=12,
        contextual=4,
        cluster_width=2,
        drop_layers=(1, 3, 7),
        keep_ratios=(0.75, 0.5, 0.125),
        query="all",
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_kept_indices_and_logits_match_loop_reference(tiny, images, prompts, config):
    forward = DuetForward(tiny.model, tiny.adapter, config)
    batch = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, config)
    trace = DuetTrace()
    with torch.no_grad():
        logits = forward(**batch, duet_trace=trace, use_cache=False).logits
    for i in range(len(prompts)):
        single = prepare_inputs(tiny.processor, tiny.adapter, images[i : i + 1], prompts[i : i + 1], config)
        if config.query == "all":
            single["duet_query_mask"] = torch.ones_like(single["duet_query_mask"])
        with torch.no_grad():
            kept, ref_logits = _loop_reference(tiny, single, config)
        for layer, indices in kept.items():
            assert trace.stage2[layer][i].tolist() == indices, f"sample {i} layer {layer}"
        # Rows are left-padded: the sample's tokens that survived are the row's last ones.
        torch.testing.assert_close(logits[i][-ref_logits.shape[0] :], ref_logits, atol=2e-5, rtol=1e-5)
