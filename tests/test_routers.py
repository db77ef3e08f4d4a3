"""The MoE literature's routers (router_type): each one's defining property, capacity-factor token dropping, and
that each trains, saves, loads and generates while DeepSeek's router stays the untouched default."""

import json
import math

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from seekmoe.model.moe import MoE
from seekmoe.model.routing import (GShardRouter, HashRouter, HierarchicalRouter, NoisyTopKRouter, SwitchRouter,
                                   limit_capacity, switch_balance_loss)
from seekmoe.train import load_run_config, train

ROUTERS = {  # router_type -> the overrides of the tiny preset it needs
    "switch": dict(num_experts_per_tok=1),
    "gshard": dict(num_experts_per_tok=2),
    "noisy_topk": dict(num_experts_per_tok=2),
    "hash": dict(num_experts_per_tok=1),
    "hierarchical": dict(num_experts_per_tok=2, n_group=4, topk_group=2),
}


def _config(router_type: str, **overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", router_type=router_type, **{**ROUTERS.get(router_type, {}), **overrides})


def test_switch_routes_each_token_to_its_top_expert_and_capacity_drops_overflow_to_the_residual():
    torch.manual_seed(0)
    config = _config("switch", n_shared_experts=0, capacity_factor=1.0)
    moe = MoE(config).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        moe.gate.weight[0] += 5.0  # expert 0 wins for inputs with a positive sum: far more than its capacity
    x = torch.rand(1, 64, config.hidden_size) + 0.1
    route = moe.gate(x.view(64, -1))
    assert route.indices.shape == (64, 1) and (route.indices[:, 0] == route.scores.argmax(-1)).all()
    torch.testing.assert_close(route.weights[:, 0], route.scores.max(-1).values)
    y, stats = moe(x)
    capacity = math.ceil(1.0 * 64 * 1 / config.n_routed_experts)  # 8 slots per expert
    on_zero = (route.indices[:, 0] == 0).nonzero()[:, 0]
    assert len(on_zero) > capacity
    served = y[0].abs().sum(-1) > 0  # no shared expert: a dropped token's MoE output is exactly zero
    assert served[on_zero[:capacity]].all() and not served[on_zero[capacity:]].any()  # earlier tokens first
    assert int(stats.dropped_slots) == len(on_zero) - capacity
    assert stats.expert_counts[0] == len(on_zero)  # counts are what the router chose, before dropping
    # The dropped tokens send no gradient to the router through the expert weights.
    moe.zero_grad()
    y[0, on_zero[capacity:]].sum().backward()
    assert moe.gate.weight.grad is None or moe.gate.weight.grad.abs().sum() == 0


def test_switch_balance_loss_is_alpha_times_E_times_sum_of_f_i_P_i():
    torch.manual_seed(0)
    router = SwitchRouter(_config("switch", router_aux_loss_coef=0.01)).train()
    torch.nn.init.normal_(router.weight, std=1.0)
    route = router(torch.randn(300, 64))
    E = router.n_experts
    f = torch.bincount(route.indices[:, 0], minlength=E).float() / 300
    expected = 0.01 * E * (f * route.scores.mean(0)).sum()
    torch.testing.assert_close(route.aux_loss, expected)
    uniform = torch.full((8, E), 1.0 / E)
    torch.testing.assert_close(switch_balance_loss(uniform, torch.arange(8) % E), torch.tensor(1.0))


def test_gshard_keeps_the_second_expert_with_probability_min_1_g2_over_threshold():
    torch.manual_seed(0)
    router = GShardRouter(_config("gshard")).train()
    torch.nn.init.normal_(router.weight, std=0.5)
    route = router(torch.randn(40000, 64))
    g2 = route.scores.gather(1, route.indices).div(route.scores.gather(1, route.indices).sum(-1, keepdim=True))[:, 1]
    expected = (g2 / 0.2).clamp(max=1.0)
    kept = route.kept[:, 1].float()
    assert route.kept[:, 0].all()
    for lo, hi in ((0.0, 0.1), (0.1, 0.2), (0.2, 0.5)):  # the keep rate follows min(1, g2 / 0.2) in every band
        band = (g2 >= lo) & (g2 < hi)
        assert band.sum() > 1000
        assert abs(kept[band].mean() - expected[band].mean()) < 0.03, (lo, hi)
    assert (route.weights[:, 1] == 0).eq(~route.kept[:, 1]).all()  # a skipped second expert has weight 0
    router.eval()  # evaluation keeps both experts, weights g1, g2 normalized
    route = router(torch.randn(100, 64))
    assert route.kept is None
    torch.testing.assert_close(route.weights.sum(-1), torch.ones(100))


def test_noisy_top_k_noise_scale_is_a_learned_softplus_and_off_in_eval():
    torch.manual_seed(0)
    router = NoisyTopKRouter(_config("noisy_topk"))
    torch.nn.init.normal_(router.weight, std=0.3)
    torch.nn.init.normal_(router.noise_weight, std=0.3)
    x = torch.randn(256, 64)
    torch.testing.assert_close(router.noise_scale(x), torch.nn.functional.softplus(x @ router.noise_weight.T) + 1e-2)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.indices, b.indices) and a.aux_loss is None
    clean = x @ router.weight.T
    assert torch.equal(a.indices.sort(-1).values, clean.topk(2, -1).indices.sort(-1).values)
    torch.testing.assert_close(a.weights, clean.gather(1, a.indices).softmax(-1))  # keep top k, then softmax
    router.train()
    c, d = router(x), router(x)
    assert not torch.equal(c.indices, d.indices)  # noise in training
    c.aux_loss.backward()  # the load loss reaches the noise scale's weights
    assert router.noise_weight.grad.abs().sum() > 0 and router.weight.grad.abs().sum() > 0


def test_hash_routing_is_a_fixed_balanced_function_of_the_token_id():
    config = _config("hash")
    a, b = HashRouter(config), HashRouter(config)
    a.reset_parameters(0.02), b.reset_parameters(0.02)
    assert torch.equal(a.expert_of_token, b.expert_of_token)  # the same table for every model of this shape
    counts = torch.bincount(a.expert_of_token, minlength=config.n_routed_experts)
    assert counts.max() - counts.min() <= 1
    ids = torch.tensor([5, 7, 5, 300, 7])
    first, second = a(torch.randn(5, 64), ids), a(torch.randn(5, 64), ids)  # hidden states do not matter
    assert torch.equal(first.indices, second.indices) and first.indices[0] == first.indices[2]
    assert torch.equal(first.indices[:, 0], a.expert_of_token[ids]) and (first.weights == 1).all()
    with pytest.raises(ValueError, match="token id"):
        a(torch.randn(5, 64))


def test_hierarchical_routing_picks_experts_only_inside_the_chosen_groups():
    torch.manual_seed(0)
    router = HierarchicalRouter(_config("hierarchical", n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                        topk_group=2))
    router.reset_parameters(0.5)
    x = torch.randn(500, 64)
    route = router(x)
    best_groups = (x @ router.weight.T).topk(2, -1).indices  # [T, 2] the primary gate's choice
    groups = route.indices // 4
    for chosen, best in zip(groups.tolist(), best_groups.tolist()):
        assert set(chosen) == set(best) and sorted(chosen).count(chosen[0]) == 2  # two experts in each group
    torch.testing.assert_close(route.weights.sum(-1), torch.ones(500))  # primary x secondary weights


def test_capacity_serves_first_choices_before_second_ones():
    weights = torch.ones(4, 2)
    # expert 0: tokens 1, 2 first, tokens 0, 3 second; expert 1: token 0 first, tokens 1, 2 second
    indices = torch.tensor([[1, 0], [0, 1], [0, 1], [2, 0]])
    from seekmoe.model.routing import RouterOutput

    route = RouterOutput(weights, indices, torch.zeros(4, 4), torch.zeros(4, 4))
    out, counts, dropped = limit_capacity(route, capacity_factor=1.0, n_experts=4)  # capacity ceil(8/4) = 2
    assert out.kept.tolist() == [[True, False], [True, True], [True, False], [True, False]]
    assert counts.tolist() == [4, 3, 1, 0] and int(dropped) == 3
    assert out.weights.tolist() == [[1, 0], [1, 1], [1, 0], [1, 0]]


def test_deepseek_router_is_the_default_dropless_and_its_config_json_unchanged(tmp_path):
    config = ModelConfig.preset("tiny")
    assert config.router_type == "deepseek" and config.train_capacity() == 0 == config.eval_capacity()
    d = config.to_dict()
    assert d["model_type"] == "deepseek_v3" and not {"router_type", "capacity_factor", "router_jitter"} & set(d)
    torch.manual_seed(0)
    model = seekmoe.build_model(config).train()
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, labels=ids)
    torch.manual_seed(0)
    same = seekmoe.build_model(config.replace(capacity_factor=0.0, eval_capacity_factor=0.0)).train()
    assert torch.equal(out.logits, same(ids, labels=ids).logits)
    # Token dropping is available to DeepSeek's router too; dropping at inference is not what transformers runs.
    dropping = config.replace(capacity_factor=0.5)
    assert dropping.model_type == "deepseek_v3" and config.replace(eval_capacity_factor=1.0).model_type == \
        "seekmoe_deepseek"
    model = seekmoe.build_model(dropping).train()
    stats = model.moe_layers()[0](torch.randn(2, 16, 64))[1]
    assert int(stats.dropped_slots) > 0


@pytest.mark.parametrize("overrides,match", [
    (dict(router_type="moe"), "router_type"),
    (dict(router_type="switch", num_experts_per_tok=2), "num_experts_per_tok"),
    (dict(router_type="gshard", num_experts_per_tok=1), "num_experts_per_tok"),
    (dict(router_type="hierarchical", num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(router_type="noisy_topk", num_experts_per_tok=8), "num_experts_per_tok"),
    (dict(router_type="switch", num_experts_per_tok=1, expert_balance_alpha=0.01), "expert_balance_alpha"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router_jitter=0.1), "router_jitter"),
])
def test_invalid_router_settings_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny", **overrides)


@pytest.mark.parametrize("router_type", sorted(ROUTERS))
def test_each_router_trains_saves_loads_and_generates(router_type, corpus, cache, tmp_path):
    model_cfg, cfg = load_run_config("tiny", overrides={
        "router_type": router_type, **ROUTERS[router_type], "router_jitter": 0.0 if router_type == "hash" else 0.01,
        "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "max_steps": 3, "eval_every": 3, "save_every": 3,
        "eval_batches": 1, "cache_dir": cache, "precision": "fp32"})
    summary = train(model_cfg, cfg, tmp_path, data=[str(corpus)], progress=False)
    assert math.isfinite(summary["final_val_loss"])
    final = tmp_path / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == f"seekmoe_{router_type}"
    model = seekmoe.from_pretrained(final)
    assert model.config.router_type == router_type and type(model.moe_layers()[0].gate) is type(
        MoE(model_cfg).gate)
    engine = Engine.from_pretrained(final, max_batch_size=2)
    prompt = [0, 5, 6, 7, 8]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0].output_ids
    assert len(out) == 6 or out[-1] == model.config.eos_token_id
    if model_cfg.eval_capacity() == 0:  # dropless: cached decoding routes as a full recomputation does
        full = model(torch.tensor([prompt + out])).logits[0]
        assert full[len(prompt) - 1: -1].argmax(-1).tolist() == out
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=f"seekmoe_{router_type}"):
        transformers.AutoConfig.from_pretrained(final)
