"""Compiled training (`compile=true`): each block is one graph with the routed experts as an opaque operator, and
the loss and gradients equal eager PyTorch's."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import seekmoe
from seekmoe import ModelConfig
from seekmoe.model import experts
from seekmoe.parallel import apply_activation_checkpointing, compile_blocks


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("groups, checkpointing", [("ragged", False), ("padded", True)])
def test_compiled_blocks_give_eager_loss_and_gradients_with_no_graph_breaks(groups, checkpointing, monkeypatch):
    if groups == "padded":  # a torch build without _grouped_mm: the operator pads the groups instead
        monkeypatch.setattr(experts, "grouped_mm_supported", lambda device_type, dtype: False)
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", num_hidden_layers=3, aux_loss_alpha=0.01)
    eager = seekmoe.build_model(config).train()
    compiled = seekmoe.build_model(config).train()
    compiled.load_state_dict(eager.state_dict())
    if checkpointing:
        apply_activation_checkpointing(eager)
        apply_activation_checkpointing(compiled)  # before compile, as parallelize applies them
    ids = torch.randint(0, config.vocab_size, (2, 24))
    want_loss, want_grads = loss_and_grads(eager, ids)

    torch._dynamo.reset()
    counters.clear()
    compile_blocks(compiled, backend="aot_eager")  # the graphs inductor would compile, captured fast
    for _ in range(2):  # the second call replays the captured graphs
        loss, grads = loss_and_grads(compiled, ids)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_grouped_swiglu_operator_passes_torch_opcheck():
    """The operator's fake (shape) rule and autograd registration agree with its real computation."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    rows = torch.randn(10, 16, requires_grad=True)
    weights = torch.rand(10, requires_grad=True)
    gate_up = torch.randn(4, 16, 16, requires_grad=True)
    down = torch.randn(4, 16, 8, requires_grad=True)
    torch.library.opcheck(experts.grouped_swiglu, (rows, weights, gate_up, down, counts.cumsum(0).to(torch.int32)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
