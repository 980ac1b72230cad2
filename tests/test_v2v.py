import pytest
import torch

from duet_export.stages.v2v import cls_attention_and_keys, v2v_merge

from loops import loop_v2v


def _inputs(batch, n, d=8, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 1 + n, d, generator=g)
    keys = torch.randn(batch, 1 + n, 4, generator=g)
    if ties:  # a handful of distinct values: many equal scores
        scores = torch.randint(0, 4, (batch, n), generator=g).float()
    else:
        scores = torch.rand(batch, n, generator=g)
    return hidden, scores, keys


CASES = [
    # (batch, N, K_d, K_c, w, ties)
    (1, 36, 10, 3, 4, False),
    (3, 36, 10, 3, 4, True),  # ties everywhere
    (2, 36, 12, 0, 4, False),  # K_c = 0
    (2, 36, 30, 5, 4, True),  # w * K_c = 20 > M = 7
    (2, 16, 1, 15, 4, False),  # only CLS dominant, every patch a candidate
    (2, 16, 17, 0, 4, False),  # every patch dominant
    (4, 49, 20, 7, 2, True),
]


@pytest.mark.parametrize(("batch", "n", "k_d", "k_c", "w", "ties"), CASES)
def test_v2v_matches_loop(batch, n, k_d, k_c, w, ties):
    hidden, scores, keys = _inputs(batch, n, seed=n + k_d, ties=ties)
    out = v2v_merge(hidden, scores, keys, k_d, k_c, w)
    assert out.tokens.shape == (batch, k_d + k_c, hidden.shape[-1])
    for b in range(batch):
        tokens, dom, anchors, members, assignment = loop_v2v(hidden[b], scores[b], keys[b], k_d, k_c, w)
        assert out.dominant[b].tolist() == dom
        assert out.anchors[b].tolist() == anchors
        assert out.members[b].tolist() == members
        assert out.assignment[b].tolist() == assignment
        torch.testing.assert_close(out.tokens[b], tokens, atol=1e-6, rtol=0)


def test_ties_break_to_lower_index():
    hidden, _, keys = _inputs(1, 8)
    scores = torch.tensor([[1.0, 5.0, 5.0, 5.0, 0.0, 5.0, 2.0, 2.0]])
    out = v2v_merge(hidden, scores, keys, dominant=3, contextual=0, cluster_width=4)
    assert out.dominant.tolist() == [[1, 2]]


def test_contextual_token_is_anchor_plus_member_mean():
    hidden, scores, keys = _inputs(1, 10, seed=3)
    out = v2v_merge(hidden, scores, keys, dominant=2, contextual=1, cluster_width=4)
    members = out.members[0]
    expected = hidden[0, 1 + out.anchors[0, 0]] + hidden[0, 1 + members].mean(dim=0)
    torch.testing.assert_close(out.tokens[0, -1], expected)


def test_gradient_flows_to_hidden_only():
    hidden, scores, keys = _inputs(2, 16)
    hidden.requires_grad_(True)
    v2v_merge(hidden, scores, keys, 5, 3, 4).tokens.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_cls_attention_row_matches_full_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 17, 16)
    q, k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    scores, keys = cls_attention_and_keys(x, q, k, num_heads=4, scale=0.5)
    qs = q(x).view(2, 17, 4, 4).transpose(1, 2)
    ks = k(x).view(2, 17, 4, 4).transpose(1, 2)
    full = torch.softmax(qs @ ks.transpose(-1, -2) * 0.5, dim=-1)  # [B, h, T, T]
    torch.testing.assert_close(scores, full[:, :, 0, 1:].sum(dim=1))
    torch.testing.assert_close(keys, ks.mean(dim=1))
