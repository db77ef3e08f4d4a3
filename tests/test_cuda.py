"""The GPU path, where a CUDA device exists (skipped elsewhere): the grouped-GEMM experts in bf16 against the
per-expert definition, and compiled decoding with CUDA graphs against eager. No line of these has run on a GPU yet:
no development machine so far had one (see benchmarks/README.md)."""

from __future__ import annotations

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from seekmoe.model.dispatch import LocalDispatcher
from seekmoe.model.experts import RoutedExperts, grouped_mm_supported
from test_experts import reference_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm", "gathered"])
def test_cuda_experts_in_bf16_match_the_per_expert_definition(backend):
    if backend == "grouped_mm" and not grouped_mm_supported("cuda", torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run on this GPU in bf16")
    torch.manual_seed(0)
    E, H, I, T, K = 16, 256, 128, 512, 4
    x = torch.randn(T, H, device="cuda")
    indices = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
    weights = torch.rand(T, K, device="cuda") + 0.1
    experts = RoutedExperts(E, H, I, backend=backend).cuda()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, H ** -0.5)
        experts.down_proj.normal_(0, I ** -0.5)
    want = reference_experts(x.double(), indices, weights.double(), experts.gate_up_proj.double(),
                             experts.down_proj.double())
    dispatcher = LocalDispatcher(E)
    with torch.no_grad() if backend == "gathered" else torch.enable_grad(), torch.autocast("cuda", torch.bfloat16):
        rows, row_weights, plan = dispatcher.dispatch(x, indices, weights)
        got = dispatcher.combine(experts(rows, row_weights, plan), plan)
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-2  # bf16 rounding, not a wrong expert


def test_cuda_graph_decoding_gives_eager_greedy_tokens():
    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset("tiny")).cuda().eval()
    prompts = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 3, 3]]
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    for speculative in (None, "mtp"):
        want = [r.output_ids for r in Engine(model, max_batch_size=4, speculative=speculative,
                                              compile=False).generate(prompts, params)]
        engine = Engine(model, max_batch_size=4, speculative=speculative, compile=True)
        assert engine.forwards.static
        assert [r.output_ids for r in engine.generate(prompts, params)] == want
