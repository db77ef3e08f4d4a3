"""Modality-aware routing (`modality_expert_groups`): image tokens (id == media_placeholder_token_id) choose only
among the image groups' experts and text tokens among the text groups', through DeepSeek's group-limited routing; an
image token routes exactly as a router holding only the image groups' experts would; the bias balances each
modality's experts among themselves; replay and probes still apply; and without the field nothing changes."""

import pytest
import torch

from seekmoe import ModelConfig, build_model, from_pretrained
from seekmoe.model.routing import DeepSeekRouter, RoutingHook, build_router

IMAGE = 7  # media_placeholder_token_id of the tests
ROUTINGS = {  # name -> overrides of the tiny preset (8 experts in 4 groups of 2)
    "v3": dict(),
    "v2": dict(topk_method="group_limited_greedy", scoring_func="softmax"),
    "greedy": dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=True),
}
SPLITS = [  # (image groups, text groups, topk_group)
    ([0], [1, 2, 3], 2),  # topk_group larger than the image side: the image token takes its one group
    ([0, 1], [2, 3], 2),
    ([3, 1], [0, 2], 1),  # non-contiguous groups, one group chosen
    ([2], [0, 1, 3], 3),
]


def _config(routing: str, image: list[int], text: list[int], topk_group: int, **overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **{**ROUTINGS[routing], "topk_group": topk_group,
                                         "media_placeholder_token_id": IMAGE,
                                         "modality_expert_groups": {"image": image, "text": text}, **overrides})


def _router(config: ModelConfig, seed: int) -> DeepSeekRouter:
    torch.manual_seed(seed)
    router = build_router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    if router.e_score_correction_bias is not None:  # a bias that matters to the choice
        router.e_score_correction_bias.normal_(0.0, 0.3)
    return router


def _mixed_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    """n token ids, about half of them the image placeholder, in random order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.5, torch.full_like(ids, IMAGE), ids)


def _groups_of(indices: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return indices // (config.n_routed_experts // config.n_group)


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("image,text,topk_group", SPLITS)
def test_modality_routing_never_leaves_the_tokens_groups(routing, image, text, topk_group):
    config = _config(routing, image, text, topk_group)
    for seed in range(3):
        router = _router(config, seed).train(seed % 2 == 0)
        ids = _mixed_ids(200, config.vocab_size, seed)
        out = router(torch.randn(200, config.hidden_size) * 3, ids)
        groups = _groups_of(out.indices, config)
        is_image = ids == IMAGE
        assert is_image.any() and (~is_image).any()
        assert torch.isin(groups[is_image], torch.tensor(image)).all()
        assert torch.isin(groups[~is_image], torch.tensor(text)).all()
        assert (out.indices.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts
        assert torch.isfinite(out.weights).all() and (out.weights > 0).all()
        if routing != "greedy":  # at most topk_group groups per token
            hits = torch.zeros(200, config.n_group, dtype=torch.bool).scatter_(1, groups, True)
            assert (hits.sum(dim=1) <= topk_group).all()


@pytest.mark.parametrize("routing", ["v3", "v2"])
@pytest.mark.parametrize("norm", [True, False])
def test_an_image_token_routes_as_a_router_holding_only_the_image_experts(routing, norm):
    """Oracle: the image groups [1, 2] (experts 2..5) as a router of their own (4 experts, 2 groups, the same rows
    of the gate and of the bias) picks the same experts with the same weights, and has the same affinities."""
    config = _config(routing, [1, 2], [0, 3], 2, norm_topk_prob=norm)
    sub_config = ModelConfig.preset("tiny", **{**ROUTINGS[routing], "n_routed_experts": 4, "n_group": 2,
                                               "topk_group": 2, "norm_topk_prob": norm})
    for seed in range(3):
        router = _router(config, seed).eval()
        sub = build_router(sub_config).eval()
        with torch.no_grad():
            sub.weight.copy_(router.weight[2:6])
            if sub.e_score_correction_bias is not None:
                sub.e_score_correction_bias.copy_(router.e_score_correction_bias[2:6])
        x = torch.randn(64, config.hidden_size).double().float()
        out = router(x, torch.full((64,), IMAGE))
        ref = sub(x)
        order, ref_order = out.indices.argsort(dim=1), ref.indices.argsort(dim=1)
        assert torch.equal(out.indices.gather(1, order), ref.indices.gather(1, ref_order) + 2)
        torch.testing.assert_close(out.weights.gather(1, order), ref.weights.gather(1, ref_order))
        torch.testing.assert_close(out.scores[:, 2:6], ref.scores)
        assert (out.scores[:, :2] == 0).all() and (out.scores[:, 6:] == 0).all()


def test_without_modality_groups_routing_is_group_limited_routing_bit_for_bit():
    """The field unset: the router's choice equals DeepSeek-V3's group-limited top-k written out here, and
    config.json gains no key."""
    config = ModelConfig.preset("tiny")
    router = _router(config, 0).eval()
    x = torch.randn(100, config.hidden_size)
    out = router(x, _mixed_ids(100, config.vocab_size, 0))
    ranking = out.scores + router.e_score_correction_bias
    grouped = ranking.view(100, config.n_group, -1)
    best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(config.topk_group, dim=-1).indices
    keep = torch.zeros(100, config.n_group, dtype=torch.bool).scatter_(1, best_groups, True)
    expected = grouped.masked_fill(~keep[..., None], float("-inf")).view(100, -1).topk(2, dim=-1).indices
    assert torch.equal(out.indices.sort(1).values, expected.sort(1).values)
    assert router.allowed_groups(None) is None
    d = config.to_dict()
    assert "modality_expert_groups" not in d and "media_placeholder_token_id" not in d
    assert d["model_type"] == "deepseek_v3"


def test_balance_losses_count_each_tokens_top_k_among_its_modalitys_experts():
    """The sequence-wise loss's plain top-k counts (MoEStats.topk_counts) of image tokens fall on image experts."""
    config = _config("v3", [0, 1], [2, 3], 2, num_nextn_predict_layers=0, aux_loss_alpha=0.01)
    torch.manual_seed(0)
    model = build_model(config).train()
    ids = torch.full((1, 16), IMAGE)
    stats = []
    moe = model.moe_layers()[0]
    moe.register_forward_hook(lambda module, args, out: stats.append(out[1]))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.balance_loss) and out.balance_loss > 0
    assert stats[0].topk_counts[4:].sum() == 0 and stats[0].topk_counts[:4].sum() == 16 * 2
    assert stats[0].score_mean[4:].sum() == 0


def test_gradients_reach_the_router_and_the_experts_of_both_modalities():
    config = _config("v3", [0, 1], [2, 3], 2, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = build_model(config).train()
    ids = _mixed_ids(64, config.vocab_size, 1).view(2, 32)
    out = model(ids, labels=ids)
    out.loss.backward()
    moe = model.moe_layers()[0]
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum(dim=1).gt(0).all()
    counts = out.expert_counts[0]
    assert counts[:4].sum() == 2 * int((ids == IMAGE).sum())  # k=2 slots per image token, all on experts 0..3
    grad = moe.experts.down_proj.grad.flatten(1).abs().sum(dim=1)  # [E]
    assert (grad[counts > 0] > 0).all() and (grad[counts == 0] == 0).all()


def test_bias_balancing_compares_each_expert_with_its_own_modality():
    """Image experts 0..3 get few tokens, text experts 4..7 many: against the mean of all experts every image expert
    would rise; against its modality's mean the busier half of each modality falls."""
    config = _config("v3", [0, 1], [2, 3], 2)
    router = _router(config, 0)
    router.e_score_correction_bias.zero_()
    router.update_bias(torch.tensor([1, 3, 1, 3, 10, 30, 10, 30]), 0.1)
    expected = 0.1 * torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])
    assert torch.equal(router.e_score_correction_bias, expected)


def test_replay_and_probes_apply_within_the_modality_groups():
    config = _config("v3", [0], [1, 2, 3], 2)
    router = _router(config, 0).eval()
    x, ids = torch.randn(50, config.hidden_size), _mixed_ids(50, config.vocab_size, 2)
    out = router(x, ids)
    router.set_routing_hook(RoutingHook(experts=out.indices))
    again = router(x, ids)
    assert torch.equal(again.indices, out.indices) and torch.equal(again.weights, out.weights)
    # an image token reaches 2 experts (one group of 2): skipping its best leaves 1
    assert router.reachable_experts() == 2
    router.set_routing_hook(RoutingHook(top_k=1, skip_top=1))
    probed = router(x, ids)
    # an image token skips the best of its own experts 0 and 1 (not the best of all 8) and takes the other
    image = ids == IMAGE
    best_own = (out.scores + router.e_score_correction_bias)[:, :2].argmax(dim=1)
    assert torch.equal(probed.indices[image, 0], 1 - best_own[image])
    with pytest.raises(ValueError, match=r"top_k \+ skip_top <= 2"):
        router.set_routing_hook(RoutingHook(top_k=2, skip_top=1))


def test_modality_groups_round_trip_through_a_saved_folder_that_transformers_would_refuse(tmp_path):
    config = _config("v3", [0, 1], [2, 3], 2)
    model = build_model(config).eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config.modality_expert_groups == {"image": [0, 1], "text": [2, 3]}
    assert loaded.config.media_placeholder_token_id == IMAGE
    assert loaded.config.model_type == "seekmoe_deepseek"  # transformers' deepseek_v3 routes without the groups
    ids = _mixed_ids(32, config.vocab_size, 3).view(2, 16)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_modality_router_needs_token_ids():
    router = _router(_config("v3", [0], [1, 2, 3], 2), 0)
    with pytest.raises(ValueError, match="expected token_ids"):
        router(torch.randn(4, 64))


@pytest.mark.parametrize("overrides,message", [
    (dict(modality_expert_groups={"image": [0, 1], "text": [1, 2, 3]}),
     r"disjoint image and text groups \(both hold \[1\]\)"),
    (dict(modality_expert_groups={"image": [0]}), r'expected a dict \{"image"'),
    (dict(modality_expert_groups={"image": [0], "text": [1, 2]}), r"groups \[3\] are in neither"),
    (dict(modality_expert_groups={"image": [0], "text": [1, 2, 4]}), r"'text': a non-empty list of group ids"),
    (dict(modality_expert_groups={"image": [], "text": [0, 1, 2, 3]}), r"'image': a non-empty list"),
    (dict(modality_expert_groups={"image": [0], "text": [1, 2, 3]}, num_experts_per_tok=3),
     r"num_experts_per_tok=3 .* at most 2, the experts an image token can reach"),
    (dict(modality_expert_groups={"image": [0], "text": [1]}, n_group=2, topk_group=1, media_placeholder_token_id=None),
     r"media_placeholder_token_id is None"),
    (dict(modality_expert_groups={"image": [0], "text": [1]}, n_group=1, topk_group=1), r"n_group \(now 1\)"),
    (dict(modality_expert_groups={"image": [0], "text": [1]}, n_group=2, topk_group=1, router_type="switch",
          num_experts_per_tok=1), r"router_type='deepseek'"),
    (dict(media_placeholder_token_id=512), r"media_placeholder_token_id=512 .* \[0, vocab_size=512\)"),
])
def test_bad_modality_settings_name_the_field_and_what_was_expected(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **{"media_placeholder_token_id": IMAGE, **overrides})
