"""optimizer=muon: the Newton-Schulz step against torch.optim.Muon and a float64 reference, Moonlight's parameter
split (AdamW for embeddings, head, norms, routers), experts per matrix, and FSDP (2 gloo processes) equal to one."""

import json
import math
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.train.config import TrainConfig
from seekmoe.train.muon import Muon, newton_schulz
from seekmoe.train.optim import build_optimizer
from test_distributed import torchrun


def ns_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration X <- aX + (bXX^T + c(XX^T)^2)X from its definition, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    transpose = x.shape[0] > x.shape[1]
    x = x.T if transpose else x
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transpose else x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_fp32_equals_a_float64_reference_and_orthogonalizes(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = newton_schulz(g)
    want = ns_reference(g)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4
    s = torch.linalg.svdvals(got.double())
    assert s.min() > 0.5 and s.max() < 1.5  # Keller's iteration: singular values near 1, not exactly 1


def test_one_muon_step_on_a_matrix_equals_torch_optim_muon():
    """Two steps (momentum carried) of Moonlight's variant: torch.optim.Muon with adjust_lr_fn='match_rms_adamw'."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(24, 40, generator=g)
    grads = [torch.randn(24, 40, generator=g) for _ in range(2)]
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [ours], "muon": True}], lr=0.02, weight_decay=0.1, momentum=0.95,
               ns_dtype=torch.bfloat16)  # torch's Muon iterates in bf16
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    moved_ours, moved_theirs = ours.detach() - w0, theirs.detach() - w0
    err = ((moved_ours - moved_theirs).abs().max() / moved_theirs.abs().max()).item()
    print(f"largest relative difference of the two Muon updates: {err:.2e}")
    assert err < 2e-2  # bf16 Newton-Schulz: the two differ only in where bf16 rounds
    # Moonlight's scale makes the update's RMS about 0.2 * lr * sqrt(max(A, B)) * RMS(orthogonal) ~ 0.2 lr
    rms = (moved_ours + 0.02 * 0.1 * w0).pow(2).mean().sqrt().item() / 2
    assert 0.1 * 0.02 < rms < 0.4 * 0.02


def test_adamw_groups_of_muon_equal_torch_adamw():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(7, 5, generator=g)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Muon([ours], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(3):
        grad = torch.randn(7, 5, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_muon_takes_hidden_matrices_and_leaves_embeddings_head_norms_routers_to_adamw():
    model = seekmoe.build_model(ModelConfig.preset("tiny"))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    adamw = groups[0] | groups[1]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw
    assert all(n in adamw for n in names.values() if ".mlp.gate." in n or n.endswith("norm.weight"))
    assert "model.layers.0.self_attn.kv_b_proj.weight" in groups[2] and "model.mtp.0.eh_proj.weight" in groups[2]
    assert "model.layers.1.mlp.experts.down_proj" in groups[2]
    assert groups[3] == {n for n in names.values() if n.endswith("experts.gate_up_proj")}
    assert set().union(*groups) == set(names.values())


def test_expert_stacks_are_orthogonalized_per_expert_and_gate_up_halves_apart():
    E, I, H = 3, 4, 6
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(E, 2 * I, H, generator=g)
    grad = torch.randn(E, 2 * I, H, generator=g)
    p = torch.nn.Parameter(w0.clone())
    p.grad = grad.clone()
    Muon([{"params": [p], "muon": True, "halves": 2}], lr=0.1, weight_decay=0.0, nesterov=False).step()
    # first step without Nesterov: the momentum buffer is (1 - momentum) grad; Newton-Schulz ignores its scale
    scale = 0.2 * math.sqrt(max(I, H))
    for e in range(E):
        for half in (slice(0, I), slice(I, 2 * I)):
            want = w0[e, half] - 0.1 * scale * ns_reference(grad[e, half]).float()
            torch.testing.assert_close(p.detach()[e, half], want, rtol=1e-4, atol=1e-5)


def test_optimizer_config_checks_name_the_field():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="muon_momentum"):
        TrainConfig(muon_momentum=1.0)


@pytest.mark.parametrize("ep,attention", [(1, "mla"), (2, "mha")])
def test_muon_under_fsdp_with_two_processes_equals_one_process(ep, attention):
    """FSDP over 2 processes (ep=1), and expert parallelism with a multi-head attention model (ep=2)."""
    torchrun(2, str(Path(__file__).parent / "muon_worker.py"), str(ep), attention)


def test_muon_training_of_a_multi_head_model_resumes_exactly(corpus, cache, tmp_path):
    """optimizer=muon through the Trainer: its state (momentum buffers, AdamW moments) survives a checkpoint."""
    from seekmoe.train import load_run_config, train
    from seekmoe.train.metrics import read_metrics

    model_cfg, cfg = load_run_config("tiny", overrides={
        "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "eval_every": 4, "save_every": 2, "eval_batches": 1,
        "cache_dir": cache, "precision": "fp32", "max_steps": 4, "optimizer": "muon", "use_mla": False,
        "rope_interleave": False, "num_nextn_predict_layers": 0})
    train(model_cfg, cfg, tmp_path / "whole", data=[str(corpus)], progress=False)
    train(model_cfg, cfg, tmp_path / "split", data=[str(corpus)], stop_at=2, progress=False)
    train(model_cfg, cfg, tmp_path / "split", data=[str(corpus)], resume=True, progress=False)
    whole, split = ([r["loss"] for r in read_metrics(tmp_path / d)] for d in ("whole", "split"))
    assert whole == split and whole[-1] < whole[0]
    assert json.loads((tmp_path / "whole" / "final" / "config.json").read_text())["use_mla"] is False


def test_v4_position_biases_stay_on_adamw_and_its_projections_go_to_muon():
    from seekmoe.train.optim import muon_parameters

    names = set(muon_parameters(seekmoe.build_model(ModelConfig.preset("tiny-v4"))))
    assert not any("position_bias" in n for n in names)
    assert any(n.endswith("attn_hc.fn") for n in names)
