"""Every routed-experts backend equals a per-expert Python loop, in the forward and in every gradient; the backend is
chosen from the table once (build, move, mode switch, configure), never from global state in the forward."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import seekmoe
from hf_oracle import hf_config, hf_model, rel_error
from seekmoe.model.dispatch import LocalDispatcher
from seekmoe.model import experts as experts_module
from seekmoe.model.experts import BACKENDS, RoutedExperts, configure_experts, select_backend

E, H, I, T, TOP_K = 6, 16, 8, 40, 2


def reference_experts(x, indices, weights, gate_up_proj, down_proj):
    """The definition: out[t] = sum_i weights[t, i] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = indices[t, i]."""
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])
        out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1))
    return out


def _routing(load: str, g: torch.Generator):
    """[T, TOP_K] distinct expert ids per token under a given load pattern, and positive weights."""
    if load == "random":
        indices = torch.rand(T, E, generator=g).topk(TOP_K, dim=-1).indices
    elif load == "some_experts_empty":  # experts 0, 2 and 5 receive nothing
        used = torch.tensor([1, 3, 4])
        indices = used[torch.rand(T, 3, generator=g).topk(TOP_K, dim=-1).indices]
    elif load == "every_token_on_one_expert":  # expert 4 gets all tokens, the others share the second slot
        others = torch.tensor([0, 1, 2, 3, 5])[torch.randint(0, 5, (T, 1), generator=g)]
        indices = torch.cat([torch.full((T, 1), 4), others], dim=1)
    else:
        raise ValueError(load)
    return indices, torch.rand(T, TOP_K, generator=g) + 0.1


def _leaves(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).requires_grad_()
    gate_up_proj = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).requires_grad_()
    down_proj = (torch.randn(E, H, I, generator=g) / I**0.5).requires_grad_()
    return g, x, gate_up_proj, down_proj


def _routed_experts(backend, gate_up_proj, down_proj, x, indices, weights):
    """The library's path: dispatch, RoutedExperts holding copies of the given weights, combine."""
    experts = RoutedExperts(E, H, I, backend=backend)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_proj)
        experts.down_proj.copy_(down_proj)
    dispatcher = LocalDispatcher(E)
    rows, row_weights, plan = dispatcher.dispatch(x, indices, weights)
    return experts, dispatcher.combine(experts(rows, row_weights, plan), plan)


@pytest.mark.parametrize("load", ["random", "some_experts_empty", "every_token_on_one_expert"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_per_expert_loop_forward_and_gradients(backend, load):
    g, x, gate_up_proj, down_proj = _leaves(seed=zlib.crc32(f"{backend}/{load}".encode()))
    indices, w = _routing(load, g)
    weights = w.requires_grad_()
    experts, got = _routed_experts(backend, gate_up_proj, down_proj, x, indices, weights)
    ref = reference_experts(x, indices, weights, gate_up_proj, down_proj)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    upstream = torch.randn(T, H, generator=g)
    got_grads = torch.autograd.grad(got, (x, weights, experts.gate_up_proj, experts.down_proj), upstream)
    ref_grads = torch.autograd.grad(ref, (x, weights, gate_up_proj, down_proj), upstream)
    for name, a, b in zip(("x", "routing weights", "gate_up_proj", "down_proj"), got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d {name}: {m}")


def test_dispatch_counts_tokens_per_expert_and_groups_rows_by_expert():
    g = torch.Generator().manual_seed(3)
    indices, weights = _routing("some_experts_empty", g)
    x = torch.randn(T, H, generator=g)
    rows, row_weights, plan = LocalDispatcher(E).dispatch(x, indices, weights)
    assert plan.counts.tolist() == torch.bincount(indices.flatten(), minlength=E).tolist()
    assert plan.offsets.tolist() == plan.counts.cumsum(0).tolist()
    assert torch.equal(plan.expert, plan.expert.sort().values)
    assert torch.equal(rows, x[plan.token])
    assert torch.equal(plan.expert, indices.flatten().sort().values)
    assert (indices[plan.token] == plan.expert[:, None]).any(dim=-1).all()  # each row went to a chosen expert
    assert torch.equal(row_weights.sort().values, weights.flatten().sort().values)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch build has no torch._grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_is_the_training_backend_where_torch_has_it(dtype):
    chosen = select_backend(torch.device("cpu"), dtype, training=True, compiled=False)
    assert (chosen.many_rows, chosen.few_rows) == ("grouped_mm", "grouped_mm")


def test_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="'cutlass'.*grouped_mm"):
        RoutedExperts(E, H, I, backend="cutlass")
    with pytest.raises(ValueError, match="'cutlass'.*grouped_mm"):
        configure_experts(seekmoe.build_model(seekmoe.ModelConfig.preset("tiny")), backend="cutlass")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_stays_close_to_fp32(backend):
    g, x, gate_up_proj, down_proj = _leaves(seed=7)
    indices, weights = _routing("random", g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts, got = _routed_experts(backend, gate_up_proj, down_proj, x, indices, weights)
    got.float().sum().backward()
    assert got.dtype == torch.bfloat16 and experts.gate_up_proj.grad.dtype == torch.float32
    assert rel_error(got, reference_experts(x, indices, weights, gate_up_proj, down_proj)) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_logits_match_transformers_with_each_backend(backend, tmp_path):
    ref_model = hf_model(hf_config("deepseek_v3"))
    ref_model.save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    configure_experts(ours, backend=backend)
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, ref_model(ids).logits) < 1e-4


@pytest.mark.parametrize("load", ["random", "some_experts_empty", "every_token_on_one_expert"])
def test_gathered_backend_equals_the_reference_without_autograd(load):
    g, x, gate_up_proj, down_proj = _leaves(seed=11)
    indices, weights = _routing(load, g)
    with torch.no_grad():
        _, got = _routed_experts("gathered", gate_up_proj, down_proj, x, indices, weights)
        want = reference_experts(x, indices, weights, gate_up_proj, down_proj)
    assert rel_error(got, want) < 1e-5


def test_backend_table_gathers_only_for_inference():
    cpu = torch.device("cpu")
    for compiled in (False, True):
        chosen = select_backend(cpu, torch.float32, training=True, compiled=compiled)
        assert "gathered" not in (chosen.many_rows, chosen.few_rows)
    eager = select_backend(cpu, torch.float32, training=False, compiled=False)
    assert eager.few_rows == "gathered" and eager.many_rows != "gathered"  # decode gathers, prefill groups
    assert select_backend(cpu, torch.float32, training=False, compiled=True).many_rows == "gathered"  # static shapes


def _count_gathered(monkeypatch) -> list:
    calls = []
    real = experts_module.gathered_swiglu
    monkeypatch.setattr(experts_module, "gathered_swiglu", lambda *a: calls.append(1) or real(*a))
    return calls


def test_backend_follows_the_module_mode_not_grad_mode(monkeypatch):
    """Decided by train()/eval() (when the model is built, moved or switched), not by torch.no_grad() in forward."""
    calls = _count_gathered(monkeypatch)
    g, x, gate_up_proj, down_proj = _leaves(seed=5)
    indices, weights = _routing("random", g)
    few = slice(0, 2)  # 4 rows for 6 experts: decoding's case
    with torch.no_grad():
        experts, _ = _routed_experts(None, gate_up_proj, down_proj, x[few], indices[few], weights[few])
    assert experts.training and not calls  # a training module under no_grad still runs the grouped operator
    experts.eval()
    dispatcher = LocalDispatcher(E)
    rows, row_weights, plan = dispatcher.dispatch(x[few], indices[few], weights[few])
    got = dispatcher.combine(experts(rows, row_weights, plan), plan)  # grad mode on: the same gathered path
    assert calls
    ref = reference_experts(x[few], indices[few], weights[few], gate_up_proj, down_proj)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert experts.gate_up_proj.grad is not None


def test_a_set_backend_survives_moves_and_mode_switches():
    experts = RoutedExperts(E, H, I, backend="padded_bmm")
    experts.to(torch.float64).eval().train()
    assert (experts.backend.many_rows, experts.backend.few_rows) == ("padded_bmm", "padded_bmm")


def test_experts_backward_saves_only_rows_and_gate_up_pre_activations():
    """The operator keeps the rows, their weights, the expert weights and h [M, 2I] for the backward: never the
    [M, I] activation nor the expert outputs."""
    g, x, gate_up_proj, down_proj = _leaves(seed=13)
    indices, weights = _routing("random", g)
    experts = RoutedExperts(E, H, I)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_proj)
        experts.down_proj.copy_(down_proj)
    rows, row_weights, plan = LocalDispatcher(E).dispatch(x, indices, weights.requires_grad_())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        experts(rows, row_weights, plan)
    M = rows.shape[0]
    assert sorted(saved) == sorted([(M, H), (M,), (E, 2 * I, H), (E, H, I), (M, 2 * I), (E,)]), saved


def test_expert_widths_grouped_mm_cannot_take_fall_back_to_padded_groups():
    """torch._grouped_mm needs 16-byte row strides: an expert width of 6 fp32 values trains through padded_bmm."""
    torch.manual_seed(0)
    config = seekmoe.ModelConfig.preset("tiny", moe_intermediate_size=6)
    model = seekmoe.build_model(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() == 3)
