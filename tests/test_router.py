"""The router: group-limited selection, selection-only bias, weight normalization and scaling."""

import pytest
import torch

from seekmoe import ModelConfig
from seekmoe.model.routing import DeepSeekRouter as Router


def _router(**overrides) -> Router:
    base = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    config = ModelConfig.preset("tiny", **{**base, **overrides})
    torch.manual_seed(0)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


@pytest.mark.parametrize("method,scoring", [("noaux_tc", "sigmoid"), ("group_limited_greedy", "softmax")])
def test_group_limited_routing_never_leaves_chosen_groups(method, scoring):
    router = _router(topk_method=method, scoring_func=scoring)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(500, 32)
    out = router(x)
    groups_used = (out.indices // (16 // 4))  # [T, k] group of each chosen expert
    n_distinct = torch.tensor([len(set(row.tolist())) for row in groups_used])
    assert (n_distinct <= 2).all()
    # The groups used are the best-scoring ones: recompute group scores independently.
    choice = out.scores + (router.e_score_correction_bias if router.e_score_correction_bias is not None else 0)
    grouped = choice.view(500, 4, 4)
    gscore = grouped.topk(2, -1).values.sum(-1) if method == "noaux_tc" else grouped.amax(-1)
    best = gscore.topk(2, -1).indices
    for row_groups, row_best in zip(groups_used.tolist(), best.tolist()):
        assert set(row_groups) <= set(row_best)


def test_greedy_routing_picks_global_top_k():
    router = _router(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1)
    x = torch.randn(64, 32)
    out = router(x)
    expected = out.scores.topk(4, dim=-1).indices
    assert torch.equal(out.indices.sort(-1).values, expected.sort(-1).values)


def test_bias_changes_selection_but_not_weights():
    router = _router()
    x = torch.randn(256, 32)
    before = router(x)
    router.e_score_correction_bias[3] = 10.0  # expert 3 now always wins selection
    after = router(x)
    assert (after.indices == 3).any(dim=-1).all()
    assert not torch.equal(before.indices, after.indices)
    # Weights come from the unbiased scores: recompute them from the chosen experts.
    w = after.scores.gather(1, after.indices)
    w = w / w.sum(-1, keepdim=True) * router.routed_scaling_factor
    torch.testing.assert_close(after.weights, w)
    assert torch.equal(before.scores, after.scores)


@pytest.mark.parametrize("norm,scale", [(True, 2.5), (True, 1.0), (False, 16.0)])
def test_weights_sum_as_configured(norm, scale):
    router = _router(norm_topk_prob=norm, routed_scaling_factor=scale, scoring_func="softmax",
                     topk_method="group_limited_greedy")
    out = router(torch.randn(128, 32))
    sums = out.weights.sum(-1)
    if norm:
        torch.testing.assert_close(sums, torch.full_like(sums, scale))
    else:
        raw = out.scores.gather(1, out.indices).sum(-1) * scale
        torch.testing.assert_close(sums, raw)
        assert (sums < scale).all()


def test_router_scores_in_fp32_under_bf16():
    router = _router().to(torch.bfloat16)
    out = router(torch.randn(16, 32, dtype=torch.bfloat16))
    assert out.scores.dtype == out.weights.dtype == torch.float32
    assert router.e_score_correction_bias.dtype == torch.float32


def test_bias_update_moves_toward_mean_load():
    router = _router()
    counts = torch.tensor([10, 0, 5, 5] * 4)
    router.update_bias(counts, speed=0.01)
    b = router.e_score_correction_bias
    assert (b[counts > 5] < 0).all() and (b[counts < 5] > 0).all() and (b[counts == 5] == 0).all()
