"""The GPU path, where a CUDA device exists (skipped elsewhere; `pytest -m cuda`, and `make gpu-check` runs them):
the model on CUDA against the CPU (fp32 tight, bf16 within bf16 rounding), the grouped-GEMM experts against the
padded backend and the per-expert definition, compiled decoding with CUDA graphs against eager, the engine at batch
32, and FSDP2 at world size 1 on NCCL (init, a step, DCP save and load).

Greedy tokens are compared in fp32, where two kernels' rounding differences (~1e-6) are far below the gaps between a
random model's top logits; in bf16 they are not, so bf16 is checked on values, with bf16's tolerance."""

from __future__ import annotations

import socket

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from seekmoe.model.dispatch import LocalDispatcher
from seekmoe.model.experts import RoutedExperts, grouped_mm_supported
from test_experts import reference_experts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return seekmoe.build_model(ModelConfig.preset("tiny", **overrides))


def test_model_on_cuda_matches_cpu_in_fp32_and_within_bf16_rounding_under_autocast():
    model = tiny_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.double()  # fp32 on the CPU, the reference
        gpu = model.cuda()
        got = gpu(ids.cuda()).logits
        with torch.autocast("cuda", torch.bfloat16):
            got_bf16 = gpu(ids.cuda()).logits
    assert rel(got.cpu(), want) < 1e-5  # same fp32 math, another summation order
    assert rel(got_bf16.float().cpu(), want) < 3e-2  # bf16's 8-bit mantissa, not a wrong path


def test_cuda_training_gradients_match_cpu_in_fp32():
    cpu = tiny_model().train()
    gpu = tiny_model().train().cuda()
    ids = torch.randint(0, cpu.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    cpu(ids, labels=ids).loss.backward()
    gpu(ids.cuda(), labels=ids.cuda()).loss.backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None and p.grad.norm() > 0:
            assert rel(q.grad.cpu(), p.grad) < 1e-4, name


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
    assert rel(got, want) < 2e-2  # bf16 rounding, not a wrong expert


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_backend_matches_padded_backend_forward_and_backward(dtype):
    if not grouped_mm_supported("cuda", dtype):
        pytest.skip(f"torch._grouped_mm does not run on this GPU in {dtype}")
    torch.manual_seed(0)
    E, H, I, T, K = 8, 128, 64, 300, 2  # uneven rows per expert, some experts possibly empty
    x = torch.randn(T, H, device="cuda")
    indices = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
    weights = torch.rand(T, K, device="cuda") + 0.1
    dy = torch.randn(T, H, device="cuda")
    outs, grads = {}, {}
    for backend in ("grouped_mm", "padded_bmm"):
        torch.manual_seed(1)
        experts = RoutedExperts(E, H, I, backend=backend).cuda()
        with torch.no_grad():
            experts.gate_up_proj.normal_(0, H ** -0.5)
            experts.down_proj.normal_(0, I ** -0.5)
        xi = x.clone().requires_grad_()
        dispatcher = LocalDispatcher(E)
        with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
            rows, row_weights, plan = dispatcher.dispatch(xi, indices, weights)
            out = dispatcher.combine(experts(rows, row_weights, plan), plan)
        out.float().backward(dy)
        outs[backend] = out.float()
        grads[backend] = [xi.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(outs["grouped_mm"], outs["padded_bmm"]) < tol
    for got, want in zip(grads["grouped_mm"], grads["padded_bmm"]):
        assert rel(got, want) < tol


def test_cuda_graph_decoding_gives_eager_greedy_tokens():
    model = tiny_model().cuda().eval()
    prompts = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 3, 3]]
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    for speculative in (None, "mtp"):
        want = [r.output_ids for r in Engine(model, max_batch_size=4, speculative=speculative,
                                              compile=False).generate(prompts, params)]
        engine = Engine(model, max_batch_size=4, speculative=speculative, compile=True)
        assert engine.forwards.static
        assert [r.output_ids for r in engine.generate(prompts, params)] == want


def test_engine_at_batch_32_gives_each_prompt_its_own_greedy_tokens():
    model = tiny_model().cuda().eval()
    g = torch.Generator().manual_seed(3)
    prompts = [[0] + torch.randint(2, model.config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (32,), generator=g)]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    alone = [Engine(model, max_batch_size=1, compile=False).generate([p], params)[0].output_ids for p in prompts[:4]]
    for compile in (False, True):
        batched = [r.output_ids for r in Engine(model, max_batch_size=32, compile=compile).generate(prompts, params)]
        assert all(len(out) == 12 for out in batched)
        assert batched[:4] == alone, f"compile={compile}"


@pytest.fixture
def nccl_world_of_one():
    """A one-process NCCL group (torchrun's variables set by hand), destroyed afterwards."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_nccl_at_world_size_1_steps_like_one_process_and_round_trips_dcp(nccl_world_of_one, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from seekmoe.parallel import ParallelConfig, apply_fsdp

    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(4)).cuda()
    mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("dp_mod_ep", "ep"))  # the layout torchrun runs get

    def sharded():
        model = tiny_model().cuda().train()
        apply_fsdp(model, mesh, ParallelConfig(mixed_precision=False), 1)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    plain = tiny_model().cuda().train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    model, opt = sharded()
    for m, o in ((plain, plain_opt), (model, opt)):
        m(ids, labels=ids).loss.backward()
        o.step()
        o.zero_grad()
    with torch.no_grad():
        want, got = plain(ids, labels=ids).loss, model(ids, labels=ids).loss
    assert abs(got.item() - want.item()) < 1e-4 * abs(want.item())

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path / "dcp"))
    fresh, fresh_opt = sharded()
    model_state, optim_state = get_state_dict(fresh, fresh_opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for m, o in ((model, opt), (fresh, fresh_opt)):  # the restored optimizer state takes the same next step
        m(ids, labels=ids).loss.backward()
        o.step()
        o.zero_grad()
    with torch.no_grad():  # not bit for bit: CUDA's index_add (the experts' combine) sums in any order
        want, got = model(ids, labels=ids).loss.item(), fresh(ids, labels=ids).loss.item()
    assert abs(got - want) < 1e-5 * abs(want)


def test_fp8_training_linears_track_bf16_on_a_float8_gpu():
    """precision=fp8 (quant/fp8.py): torchao's float8 linears swapped in, a training step's loss within float8
    rounding of bf16 autocast's, and the gradients finite (needs compute capability 8.9+ and torchao)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    pytest.importorskip("torchao")
    from seekmoe.quant.fp8 import convert_to_fp8_training

    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", hidden_size=128, moe_intermediate_size=128, intermediate_size=256,
                                q_lora_rank=128, kv_lora_rank=128, num_nextn_predict_layers=0)
    model = seekmoe.build_model(config).cuda().train()
    ids = torch.randint(0, config.vocab_size, (4, 64), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        want = model(ids, labels=ids).loss.item()
    recipe = convert_to_fp8_training(model, torch.device("cuda"))
    assert any("Float8" in type(m).__name__ for m in model.modules())
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - want) < 0.05 * want, (recipe, loss.item(), want)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
