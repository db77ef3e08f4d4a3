"""The router interface (model/routing/): every router speaks it, says what it provides, and honours the routing
hook the same way — replay reproduces a router's own choice and weighs replayed experts as that router weighs its
choice — so GRPO's routing replay works with the DeepSeek router, Switch and GShard alike."""

import pytest
import torch

from seekmoe import ModelConfig, build_model
from seekmoe.model.routing import RoutingHook, build_router
from seekmoe.train.balance import update_router_biases

ROUTERS = {  # name -> ModelConfig overrides of the tiny preset
    "deepseek": {},
    "deepseek_v2": dict(topk_method="group_limited_greedy", scoring_func="softmax"),
    "switch": dict(router_type="switch", num_experts_per_tok=1),
    "gshard": dict(router_type="gshard", num_experts_per_tok=2),
    "noisy_topk": dict(router_type="noisy_topk", num_experts_per_tok=2),
    "hash": dict(router_type="hash", num_experts_per_tok=1),
    "hierarchical": dict(router_type="hierarchical", num_experts_per_tok=4, n_group=4, topk_group=2),
}


def _router(name: str, seed: int = 0):
    config = ModelConfig.preset("tiny", **ROUTERS[name])
    torch.manual_seed(seed)
    router = build_router(config)
    router.reset_parameters(0.5)
    for p in router.parameters():  # noisy top-k starts at zeros: give every router a choice to make
        torch.nn.init.normal_(p, std=0.5)
    return router, config


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_replaying_a_routers_own_choice_reproduces_its_output_exactly(name):
    router, config = _router(name)
    router.eval()
    x, ids = torch.randn(40, config.hidden_size), torch.randint(0, config.vocab_size, (40,))
    out = router(x, ids)
    assert out.indices.dtype == torch.long and out.indices.shape == (40, config.num_experts_per_tok)
    assert out.weights.dtype == out.scores.dtype == torch.float32 and out.scores.shape == (40, config.n_routed_experts)
    router.set_routing_hook(RoutingHook(experts=out.indices))
    again = router(x, ids)
    assert torch.equal(again.indices, out.indices) and torch.equal(again.weights, out.weights)
    # -1 entries are chosen as usual
    router.set_routing_hook(RoutingHook(experts=torch.full_like(out.indices, -1)))
    assert torch.equal(router(x, ids).indices, out.indices)


@pytest.mark.parametrize("name", ["deepseek", "switch", "gshard"])
def test_replayed_experts_are_weighed_from_the_routers_own_scores_and_train_it(name):
    router, config = _router(name)
    router.train()
    x = torch.randn(64, config.hidden_size)
    forced = torch.stack([torch.randperm(config.n_routed_experts)[:config.num_experts_per_tok] for _ in range(64)])
    router.set_routing_hook(RoutingHook(experts=forced))
    out = router(x)
    assert torch.equal(out.indices, forced)
    picked = out.scores.gather(1, forced).double()
    if name == "deepseek":  # sigmoid scores normalized over the replayed experts, times the scaling factor
        expected = picked / picked.sum(-1, keepdim=True) * config.routed_scaling_factor
    elif name == "gshard":  # g1, g2 normalized to sum 1; the random policy may still skip the second
        expected = picked / (picked.sum(-1, keepdim=True) + 1e-9) * out.kept
    else:
        expected = picked
    torch.testing.assert_close(out.weights.double(), expected)
    (out.weights.sum() + (0 if out.aux_loss is None else out.aux_loss)).backward()
    assert router.weight.grad.abs().sum() > 0


def test_a_replay_of_the_wrong_shape_is_refused_with_the_expected_shape():
    router, config = _router("switch")
    router.set_routing_hook(RoutingHook(experts=torch.zeros(5, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"shape \(5, 2\).*expected \(7, 1\)"):
        router(torch.randn(7, config.hidden_size))


def test_probe_hooks_apply_to_every_router_that_ranks_its_experts():
    for name in ("switch", "gshard", "noisy_topk", "deepseek"):
        router, config = _router(name)
        router.eval()
        x = torch.randn(32, config.hidden_size)
        best = router(x).scores.argmax(-1)  # the best expert (no selection bias after reset)
        router.set_routing_hook(RoutingHook(top_k=3, skip_top=1))
        out = router(x)
        assert out.indices.shape == (32, 3) and not (out.indices == best[:, None]).any(), name
    hierarchical, _ = _router("hierarchical")
    hierarchical.set_routing_hook(RoutingHook(top_k=2))  # one expert from each of its two groups
    with pytest.raises(ValueError, match="top_k=3 with skip_top=0: expected a multiple of topk_group=2"):
        hierarchical.set_routing_hook(RoutingHook(top_k=3))
    with pytest.raises(ValueError, match="skip_top=1: HashRouter does not rank experts"):
        _router("hash")[0].set_routing_hook(RoutingHook(skip_top=1))


def test_routers_say_what_they_provide_and_only_biased_ones_are_moved():
    provided = {name: (r.uses_balance_losses, r.uses_bias_balancing)
                for name, r in ((n, _router(n)[0]) for n in ROUTERS)}
    assert provided == {"deepseek": (True, True), "deepseek_v2": (True, False), "switch": (False, False),
                        "gshard": (False, False), "noisy_topk": (False, False), "hash": (False, False),
                        "hierarchical": (False, False)}
    for name in ("deepseek", "switch"):
        model = build_model(ModelConfig.preset("tiny", **ROUTERS[name]))
        layers = model.moe_layers()
        counts = torch.arange(8).repeat(len(layers), 1)
        update_router_biases(layers, counts, 0.1)  # the trainer calls it whatever the router
        if name == "deepseek":
            assert (layers[0].gate.e_score_correction_bias[:4] > 0).all()
        ids = torch.randint(0, 512, (2, 8))
        out = model.train()(ids, labels=ids)
        assert out.balance_loss is not None and torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["deepseek", "switch", "gshard"])
def test_grpo_routing_replay_reproduces_the_recorded_experts_and_logits(name, tmp_path):
    from seekmoe.inference.chat_template import format_chat
    from seekmoe.inference.tokenizer import Tokenizer
    from seekmoe.posttrain.demo import make_base_model
    from seekmoe.posttrain.grpo import GRPOConfig
    from seekmoe.posttrain.rollout import Rollouts, make_grpo_forward
    from seekmoe.posttrain.routing_replay import capture_routing, replay_routing
    from seekmoe.posttrain.tasks import ChainSum, sft_records
    from seekmoe.train.config import TrainConfig
    from seekmoe import from_pretrained

    task = ChainSum(terms=2, max_value=4)
    texts = [format_chat([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}])
             for r in sft_records(task, 200, seed=1)]
    folder = make_base_model(tmp_path / "base", texts, num_nextn_predict_layers=0, **ROUTERS[name])
    model, tok = from_pretrained(folder), Tokenizer(folder)
    with torch.no_grad():  # well separated router scores: the engine's and the full forward's choices agree
        for moe in model.moe_layers():
            moe.gate.weight.mul_(100.0)
    grpo = GRPOConfig(prompts_per_step=2, num_generations=2, max_new_tokens=4)
    rollouts = Rollouts(task, tok, TrainConfig(batch_size=4), grpo)
    rollouts.bind(model, torch.device("cpu"))
    batch = rollouts.next_micro_batches()[0]
    fed = (batch.experts[0] >= 0).all(dim=-1)
    assert fed.sum() > 0
    # GRPO's forward (training mode, replay on) routes exactly the recorded experts
    with capture_routing(model) as chosen:
        out = make_grpo_forward(grpo)(model, batch, torch.device("cpu"), None)
    assert torch.isfinite(out.loss)
    for layer, recorded in enumerate(batch.experts):
        assert torch.equal(chosen[layer][0][fed], recorded[fed])
    # and, evaluated, gives the logits the original (unreplayed) forward gives: the same experts, the same weights
    model.eval()
    with torch.no_grad(), capture_routing(model) as natural:
        original = model(batch.input_ids).logits
    with torch.no_grad(), replay_routing(model, batch.experts):
        replayed = model(batch.input_ids).logits
    assert torch.equal(natural[0][0][fed].sort(-1).values, batch.experts[0][fed].sort(-1).values)
    torch.testing.assert_close(replayed, original, rtol=1e-5, atol=1e-5)
    # scrambled experts are used whatever the router would choose, and change the logits
    scrambled = [torch.where(e >= 0, (e + 3) % model.config.n_routed_experts, e) for e in batch.experts]
    with torch.no_grad(), replay_routing(model, scrambled), capture_routing(model) as forced:
        moved = model(batch.input_ids).logits
    assert torch.equal(forced[0][0][fed], scrambled[0][fed]) and not torch.allclose(moved, original)


def test_analysis_probes_override_a_literature_routers_choice_and_refuse_hash_routing():
    from seekmoe.analysis import RoutingCapture, routing_override

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0, **ROUTERS["switch"])).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad(), RoutingCapture(model) as natural:
        model(ids)
    with torch.no_grad(), routing_override(model, top_k=2, skip_top=1), RoutingCapture(model) as probed:
        model(ids)
    best, probed_indices = natural.layers()[0].indices, probed.layers()[0].indices
    assert probed_indices.shape == (32, 2) and not (probed_indices == best).any()
    hashed = build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0, **ROUTERS["hash"]))
    with pytest.raises(ValueError, match="top_k=2 with skip_top=0: HashRouter does not rank experts"):
        with routing_override(hashed, top_k=2):
            pass
