"""Training numerics to the letter of DeepSeek-V3 (issue 16): fp32 routing under autocast, the balance statistics
of eq. 17-20 on the plain top-k of unbiased affinities, global-batch balance statistics, the device-level loss,
a selection bias that no cast moves, sequence lengths the MTP depth cannot use, and YaRN as its own stage."""

import json

import pytest
import torch
from safetensors import safe_open

import seekmoe
from seekmoe import ModelConfig
from seekmoe.model.moe import MoE, BalanceWindow
from seekmoe.model.routing import DeepSeekRouter as Router
from seekmoe.train import load_run_config, train
from seekmoe.train.metrics import read_metrics
from seekmoe.train.trainer import Trainer


def test_router_is_fp32_and_picks_the_same_experts_under_bf16_autocast():
    config = ModelConfig.preset("tiny", hidden_size=256, n_routed_experts=64, n_group=8, topk_group=4,
                                num_experts_per_tok=8)
    torch.manual_seed(0)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.05)
    router.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randn(2048, 256)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = router(x)
    for field in ("weights", "scores", "logits"):
        assert getattr(auto, field).dtype == torch.float32, field
    assert torch.equal(auto.indices.sort(-1).values, plain.indices.sort(-1).values)
    torch.testing.assert_close(auto.weights, plain.weights)


def _moe(seed=0, **overrides):
    config = ModelConfig.preset("tiny", **{"aux_loss_alpha": 0.0, **overrides})
    torch.manual_seed(seed)
    moe = MoE(config).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe, config


def _scores64(moe, x):
    logits = x.reshape(-1, x.shape[-1]).double() @ moe.gate.weight.double().t()
    return logits.sigmoid() if moe.config.scoring_func == "sigmoid" else logits.softmax(-1)


def _f_and_p64(scores, K, E):
    """Eq. 18-20 over the rows of `scores` [T, E]: f_i = E/(K T) sum_t 1(i in TopK(s_t)), P_i = mean_t s'_{i,t}."""
    hits = torch.zeros_like(scores).scatter_(1, scores.topk(K, dim=-1).indices, 1.0)
    f = hits.mean(0) * E / K
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    return f, p


def test_sequence_wise_balance_loss_counts_the_plain_top_k_of_unbiased_scores():
    moe, config = _moe(aux_loss_alpha=0.1)
    moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # forces experts 0 and 1
    B, S, E, K = 3, 16, config.n_routed_experts, config.num_experts_per_tok
    x = torch.randn(B, S, config.hidden_size)
    _, stats = moe(x)
    assert (stats.expert_counts[:2] == B * S).all()  # the real selection is all bias
    scores = _scores64(moe, x).view(B, S, E)
    expected = 0.1 * torch.stack([(lambda f, p: (f * p).sum())(*_f_and_p64(scores[b], K, E)) for b in range(B)]).mean()
    assert stats.balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_expert_and_device_losses_count_the_whole_step_with_a_window():
    moe, config = _moe(expert_balance_alpha=0.1, device_balance_alpha=0.05)
    E, K, G = config.n_routed_experts, config.num_experts_per_tok, config.n_group
    window = BalanceWindow()
    xs = [torch.randn(2, 8, config.hidden_size) for _ in range(2)]
    from seekmoe.model.moe import batch_balance_loss

    got = []
    for x in xs:
        _, stats = moe(x)
        got.append(batch_balance_loss([stats], config, 16, window).item())
    # micro-batch 2 counts f over micro-batches 1 and 2; P over its own tokens only
    scores = [_scores64(moe, x) for x in xs]
    f_all, _ = _f_and_p64(torch.cat(scores), K, E)
    _, p2 = _f_and_p64(scores[1], K, E)
    expected = 0.1 * (f_all * p2).sum() + 0.05 * (f_all.view(G, -1).mean(-1) * p2.view(G, -1).sum(-1)).sum()
    assert got[1] == pytest.approx(expected.item(), rel=1e-5)
    f1, p1 = _f_and_p64(scores[0], K, E)
    expected1 = 0.1 * (f1 * p1).sum() + 0.05 * (f1.view(G, -1).mean(-1) * p1.view(G, -1).sum(-1)).sum()
    assert got[0] == pytest.approx(expected1.item(), rel=1e-5)


def test_device_balance_loss_with_one_group_is_refused():
    config = ModelConfig.preset("tiny", n_group=1, topk_group=1, device_balance_alpha=0.01)
    model = seekmoe.build_model(config).train()
    with pytest.raises(ValueError, match="device_balance_alpha"):
        model(torch.randint(0, 512, (1, 8)), labels=torch.randint(0, 512, (1, 8)))


def test_casting_the_model_never_moves_the_selection_bias(tmp_path):
    model = seekmoe.build_model(ModelConfig.preset("tiny"))
    gate = model.moe_layers()[0].gate
    gate.e_score_correction_bias.copy_(torch.randn(8) * 1e-3 + 0.0123)
    before = gate.e_score_correction_bias.clone()
    model.to(torch.bfloat16)
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, before)
    model.save_pretrained(tmp_path)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = f.get_tensor(key)
    assert saved.dtype == torch.float32 and torch.equal(saved, before)
    loaded = seekmoe.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(loaded.moe_layers()[0].gate.e_score_correction_bias, before)


def test_sequences_too_short_for_the_mtp_depth_are_refused_before_tokenizing(tmp_path):
    model_config, config = load_run_config("tiny", overrides={"seq_len": 2, "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ValueError, match="seq_len=2"):
        Trainer(model_config, config, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_evaluation_runs_no_mtp_module_unless_asked():
    model = seekmoe.build_model(ModelConfig.preset("tiny"))
    ids = torch.randint(0, 512, (2, 16))
    assert model.train()(ids, labels=ids).mtp_loss is not None
    assert model.eval()(ids, labels=ids).mtp_loss is None
    assert model.eval()(ids, labels=ids, mtp=True).mtp_loss is not None


def test_preset_pretraining_within_the_original_context_uses_plain_rope():
    model, _ = load_run_config("deepseek-v3", overrides={"seq_len": 1024})
    assert model.rope_scaling is None and model.max_position_embeddings == 4096
    model, _ = load_run_config("deepseek-v3", overrides={"seq_len": 8192})
    assert model.rope_scaling["factor"] == 40


def test_metrics_report_mtp_layers_apart_from_the_main_model(corpus, tmp_path):
    model_config, config = load_run_config("tiny", overrides={
        "seq_len": 32, "batch_size": 2, "max_steps": 2, "eval_every": 2, "save_every": 2, "eval_batches": 1,
        "cache_dir": str(tmp_path / "cache"), "precision": "fp32", "grad_accum": 2, "expert_balance_alpha": 0.01})
    train(model_config, config, tmp_path / "run", data=[str(corpus)], progress=False)
    record = read_metrics(tmp_path / "run")[-1]
    assert len(record["expert_load"]) == model_config.n_moe_layers
    assert len(record["expert_load_mtp"]) == model_config.num_nextn_predict_layers
    assert "max_vio_mtp" in record and "max_vio" in record


def test_context_extension_stage_sets_yarn_keeps_weights_and_loads_in_transformers(corpus, tmp_path):
    from hf_oracle import rel_error

    common = {"batch_size": 2, "eval_every": 50, "eval_batches": 1, "cache_dir": str(tmp_path / "cache"),
              "precision": "fp32"}
    model_config, config = load_run_config("tiny", overrides={**common, "seq_len": 32, "max_steps": 3,
                                                              "max_position_embeddings": 32, "save_every": 3})
    train(model_config, config, tmp_path / "pre", data=[str(corpus)], progress=False)
    pre = seekmoe.from_pretrained(tmp_path / "pre" / "final")
    model_config, config = load_run_config(None, overrides={**common, "max_steps": 1, "save_every": 1, "lr": 1e-12,
                                                            "min_file_bytes": 0},
                                           init_from=tmp_path / "pre" / "final", extend_context=64)
    assert config.seq_len == 64 and config.warmup_steps == 0
    train(model_config, config, tmp_path / "ext", data=[str(corpus)], progress=False,
          init_from=tmp_path / "pre" / "final")
    saved = json.loads((tmp_path / "ext" / "final" / "config.json").read_text())
    scaling = saved.get("rope_scaling") or saved.get("rope_parameters")
    assert scaling["factor"] == 2.0 and scaling["original_max_position_embeddings"] == 32
    ext = seekmoe.from_pretrained(tmp_path / "ext" / "final")
    for (name, a), (_, b) in zip(pre.state_dict().items(), ext.state_dict().items()):
        if "e_score_correction_bias" not in name:  # lr ~0: weights as loaded; the bias update still moves
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ext" / "final", attn_implementation="eager").float().eval()
    ids = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        assert rel_error(ext.eval()(ids).logits, hf(ids).logits) < 1e-4
