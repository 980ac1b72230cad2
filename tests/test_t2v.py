import pytest
import torch

from duet_export.stages.t2v import t2v_keep, t2v_scores

from loops import loop_t2v_scores, ranked


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_scores_match_loop(heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, q, t, d = 2, 3, 12, 8
    queries = torch.randn(b, heads, q, d, generator=g)
    keys = torch.randn(b, kv_heads, t, d, generator=g)
    q_pos = torch.tensor([[9, 10, 11], [8, 11, 11]])
    allowed = torch.arange(t).view(1, 1, t) <= q_pos.unsqueeze(-1)
    allowed[1, :, 0] = False  # sample 1 is left-padded by one token
    valid = torch.tensor([[True, True, True], [True, True, False]])
    visual = torch.tensor([[2, 3, 4, 5, 6], [3, 4, 5, 6, 7]])
    got = t2v_scores(queries, keys, allowed, valid, visual, scale=d**-0.5)
    for i in range(b):
        want = loop_t2v_scores(queries[i], keys[i], allowed[i], valid[i], visual[i], d**-0.5)
        torch.testing.assert_close(got[i], torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep", [0, 1, 3, 7])
def test_keep_matches_loop_with_ties(keep):
    g = torch.Generator().manual_seed(keep)
    scores = torch.randint(0, 3, (3, 7), generator=g).float()
    kept = t2v_keep(scores, keep)
    for i in range(3):
        assert kept[i].tolist() == sorted(ranked(scores[i].tolist())[:keep])
