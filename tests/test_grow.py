"""Growing models: `expand` keeps a model's outputs exactly (--init zero) or starts new experts as copies, keeps the
router groups valid; training `--train new-experts,router` moves only those weights; `upcycle` turns a dense model
into a MoE whose initial loss is the dense model's."""

import json

import pytest
import torch
import torch.nn.functional as F

import seekmoe
from seekmoe import ModelConfig, build_model
from seekmoe.cli import main
from seekmoe.grow import GrowRecord, expand_model
from seekmoe.grow.expand import plan_layout


def trained_like(config: ModelConfig, seed: int = 0) -> seekmoe.CausalLM:
    """A random model whose selection biases are spread as after training (not all zero)."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def blas_columns_independent(hidden: int, old: int, new: int) -> bool:
    """Whether this BLAS computes column j of x @ W^T bit-identically for W of `old` and of `new` rows (the router
    logits of the old experts): true on the CPUs here for widths >= 12, not across every width on every BLAS."""
    torch.manual_seed(1)
    x, w = torch.randn(64, hidden), torch.randn(new, hidden)
    return torch.equal(F.linear(x, w[:old]), F.linear(x, w)[:, :old])


@pytest.mark.parametrize("n_add", [4, 8])
def test_zero_expansion_keeps_logits_and_losses_exactly(n_add):
    config = ModelConfig.preset("tiny", n_routed_experts=16)
    model = trained_like(config)
    grown, report = expand_model(model, n_add, init="zero")
    assert report.exact and not report.changes
    assert grown.config.n_routed_experts == 16 + n_add and grown.config.n_group == config.n_group
    ids = torch.randint(0, config.vocab_size, (3, 40))
    with torch.no_grad():
        old, new = model(ids, labels=ids, mtp=True), grown(ids, labels=ids, mtp=True)
    if blas_columns_independent(config.hidden_size, 16, 16 + n_add):
        assert torch.equal(old.logits, new.logits)
        assert torch.equal(old.mtp_loss, new.mtp_loss)
    else:  # the router's matmul rounds the old columns differently at another width (see the docstring above)
        torch.testing.assert_close(old.logits, new.logits, rtol=0, atol=1e-5)
    record = GrowRecord.of(grown.config)
    added = plan_layout(config, n_add).added
    assert set(record.new) == {"model.layers.1.mlp", "model.mtp.0.mlp"} and record.new["model.layers.1.mlp"] == added
    assert new.expert_counts[:, added].sum() == 0  # unselectable until the bias update raises them


def test_new_experts_sit_at_the_end_of_every_router_group():
    layout = plan_layout(ModelConfig.preset("tiny"), 4)  # 8 experts in 4 groups of 2 -> 4 groups of 3
    assert layout.old_to_new == [0, 1, 3, 4, 6, 7, 9, 10] and layout.added == [2, 5, 8, 11]
    assert layout.source == [0, 2, 4, 6]  # each copies an expert of its own group


def test_adding_a_non_multiple_of_n_group_merges_groups_and_says_so():
    config = ModelConfig.preset("tiny", n_routed_experts=16)  # n_group 4, topk_group 2
    grown, report = expand_model(trained_like(config), 2, init="zero")
    assert (grown.config.n_routed_experts, grown.config.n_group, grown.config.topk_group) == (18, 2, 1)
    assert not report.exact and "n_group 4 -> 2" in report.changes[0] and "routing changes" in report.changes[0]


def test_copy_expansion_starts_new_experts_near_their_sources():
    config = ModelConfig.preset("tiny", n_routed_experts=16)
    model = trained_like(config)
    grown, _ = expand_model(model, 4, init="copy", noise=0.01)
    layout = plan_layout(config, 4)
    old, new = model.model.layers[1].mlp, grown.model.layers[1].mlp
    for j, src in zip(layout.added, layout.source):
        w_new, w_src = new.experts.gate_up_proj[j], old.experts.gate_up_proj[src]
        rel = (w_new - w_src).norm() / w_src.norm()
        assert 0 < rel < 0.03
        tolerance = 0.06 * float(old.gate.weight.detach().std())  # noise 0.01 x std, 6 sigma
        assert torch.allclose(new.gate.weight[j], old.gate.weight[src], atol=tolerance)
    keep = torch.tensor(layout.old_to_new)
    assert torch.equal(new.experts.down_proj[keep], old.experts.down_proj)
    assert torch.equal(new.gate.e_score_correction_bias[keep], old.gate.e_score_correction_bias)


def test_zero_expansion_refuses_a_softmax_router_and_layers_outside_the_moe():
    v2 = ModelConfig.preset("tiny", topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="--init zero needs"):
        expand_model(build_model(v2), 4, init="zero")
    with pytest.raises(ValueError, match=r"--layers \[0\] are not MoE layers"):
        expand_model(build_model(ModelConfig.preset("tiny")), 4, layers=[0])


def test_layers_left_out_get_dormant_unselectable_slots():
    config = ModelConfig.preset("tiny", n_routed_experts=16)
    grown, report = expand_model(trained_like(config), 4, layers=[1], init="copy")
    record = GrowRecord.of(grown.config)
    assert list(record.new) == ["model.layers.1.mlp"] and list(record.dormant) == ["model.mtp.0.mlp"]
    mtp = grown.model.mtp[0].mlp
    dormant = torch.tensor(record.dormant["model.mtp.0.mlp"])
    assert torch.all(mtp.experts.down_proj[dormant] == 0)
    assert mtp.gate.e_score_correction_bias[dormant].max() < mtp.gate.e_score_correction_bias.max() - 1


def test_expand_command_writes_a_loadable_folder_with_its_tokenizer(tmp_path, capsys):
    config = ModelConfig.preset("tiny", n_routed_experts=16)
    trained_like(config).save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "tokenizer.json").write_text("{}")
    assert main(["expand", "--model", str(tmp_path / "old"), "--add-experts", "4", "--init", "zero",
                 "--out", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "16 -> 20" in out and "exactly the old model's" in out
    assert (tmp_path / "new" / "tokenizer.json").is_file()
    grown = seekmoe.from_pretrained(tmp_path / "new")
    assert grown.config.n_routed_experts == 20
    assert json.loads((tmp_path / "new" / "config.json").read_text())["grown_experts"]["init"] == "zero"
    assert main(["expand", "--model", str(tmp_path / "new"), "--add-experts", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--add-experts 0 is invalid" in capsys.readouterr().err


def test_training_new_experts_and_router_leaves_every_other_weight_bit_identical(corpus, cache, tmp_path):
    from seekmoe.train import load_run_config, train
    from seekmoe.train.metrics import read_metrics

    settings = {"seq_len": 32, "batch_size": 4, "warmup_steps": 1, "eval_every": 100, "eval_batches": 1,
                "cache_dir": cache, "precision": "fp32", "lr": 1e-2}
    train(*load_run_config("tiny", overrides={**settings, "max_steps": 2, "save_every": 2}), tmp_path / "pre",
          data=[str(corpus)], progress=False)
    assert main(["expand", "--model", str(tmp_path / "pre" / "final"), "--add-experts", "4", "--init", "zero",
                 "--out", str(tmp_path / "grown")]) == 0
    overrides = {**settings, "max_steps": 6, "save_every": 6, "trainable": "new-experts,router",
                 "new_expert_bias_update_speed": 0.5, "new_expert_onboarding_steps": 6}
    train(*load_run_config(None, overrides=overrides, init_from=tmp_path / "grown"), tmp_path / "post",
          data=[str(corpus)], progress=False, init_from=tmp_path / "grown")
    before = seekmoe.from_pretrained(tmp_path / "grown").state_dict()
    after = seekmoe.from_pretrained(tmp_path / "post" / "final").state_dict()
    new = GrowRecord.of(seekmoe.ModelConfig.from_json_file(tmp_path / "grown")).new["model.layers.1.mlp"]
    old = [e for e in range(12) if e not in new]
    moved = set()
    for key, value in before.items():
        if key.endswith(".mlp.experts.gate_up_proj") or key.endswith(".mlp.experts.down_proj"):
            assert torch.equal(value[old], after[key][old]), key
            if not torch.equal(value[new], after[key][new]):
                moved.add(key)
        elif key.endswith("e_score_correction_bias"):
            continue  # moved by the balancing rule, not by the optimizer
        elif torch.equal(value, after[key]):
            assert not key.endswith(".mlp.gate.weight"), f"{key} was to train"
        else:
            moved.add(key)
    assert moved == {f"{p}.{t}" for p in ("model.layers.1.mlp", "model.mtp.0.mlp")
                     for t in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    assert all(r["expert_load"][0][e] > 0 for r in read_metrics(tmp_path / "post")[-1:] for e in new)
    groups = json.loads((tmp_path / "post" / "checkpoints" / "step-00000006" / "optimizer.json").read_text())
    names = sorted(n for g in groups["param_groups"] for n in g["params"])
    assert names == sorted(f"model.{p}.mlp.{t}" for p in ("layers.1", "mtp.0")
                           for t in ("gate.weight", "experts.providers.trainable.gate_up_proj",
                                     "experts.providers.trainable.down_proj"))


def test_train_selection_names_an_unknown_item_clearly():
    from seekmoe.train.freeze import select_trainable

    model = build_model(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="'attn' matches no parameter"):
        select_trainable(model, "router,attn")
    with pytest.raises(ValueError, match="records no added experts"):
        select_trainable(model, "new-experts")
    selection = select_trainable(model, "model.layers.*.self_attn.*,norms")
    assert selection.trainable_params > 0 and all("attn" in n or "norm" in n for n in selection.trainable_names)


@pytest.mark.parametrize("experts,top_k,shared,granularity", [(8, 2, 0, 1), (8, 2, 1, 1), (16, 8, 4, 4)])
def test_upcycled_model_starts_at_the_dense_models_loss(experts, top_k, shared, granularity):
    """Copies (or G slices of copies) of each FFN with normalized top-k weights compute the FFN again: the loss
    agrees to float rounding. Tolerance 1e-5 on a loss of ~6.6 (measured: <= 1e-6; logits within 2e-6)."""
    from seekmoe.grow import upcycle_model

    torch.manual_seed(0)
    dense = build_model(ModelConfig.preset("tiny-dense", initializer_range=0.1)).eval()  # FFNs that matter
    moe, report = upcycle_model(dense, experts, top_k, shared, granularity)
    assert moe.config.n_moe_layers == 2 and moe.config.moe_intermediate_size == 128 // granularity
    ids = torch.randint(0, 512, (3, 48))
    with torch.no_grad():
        d, m = dense(ids, labels=ids, mtp=True), moe(ids, labels=ids, mtp=True)
        h = torch.randn(2, 16, 64)
        layer_moe, _ = moe.model.layers[1].mlp(h)
        layer_ffn = dense.model.layers[1].mlp(h)
    assert abs(float(m.lm_loss - d.lm_loss)) < 1e-5 and abs(float(m.mtp_loss - d.mtp_loss)) < 1e-5
    torch.testing.assert_close(layer_moe, layer_ffn, rtol=1e-4, atol=1e-6)


def test_upcycle_refuses_what_cannot_start_at_the_dense_output():
    from seekmoe.grow import upcycle_model

    dense = build_model(ModelConfig.preset("tiny-dense"))
    with pytest.raises(ValueError, match="--top-k 3 is invalid"):
        upcycle_model(dense, 8, 3, granularity=2)
    with pytest.raises(ValueError, match="--shared 1 is invalid"):
        upcycle_model(dense, 8, 2, n_shared=1, granularity=2)
    with pytest.raises(ValueError, match="--top-k 1 is invalid"):
        upcycle_model(dense, 8, 1)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_model(build_model(ModelConfig.preset("tiny")), 8, 2)


def test_upcycle_command_writes_a_moe_folder(tmp_path, capsys):
    build_model(ModelConfig.preset("tiny-dense")).save_pretrained(tmp_path / "dense")
    assert main(["upcycle", "--model", str(tmp_path / "dense"), "--experts", "8", "--top-k", "4", "--granularity",
                 "2", "--shared", "2", "--out", str(tmp_path / "moe")]) == 0
    assert "8 routed experts of width 64 (4 copies x 2 slices), top-4, 2 shared" in capsys.readouterr().out
    config = seekmoe.from_pretrained(tmp_path / "moe").config
    assert (config.n_routed_experts, config.first_k_dense_replace, config.routed_scaling_factor) == (8, 0, 1.0)


def test_partly_trainable_experts_save_and_load_as_plain_stacked_experts(tmp_path):
    """What the Hugging Face layout holds (and what resuming loads back) is the usual [E, ...] stack, new rows merged
    in; the state dict keeps the trainable rows apart, the same in one process and sharded."""
    from seekmoe.model.experts import fold_weight_providers
    from seekmoe.train.freeze import make_partly_trainable

    config = ModelConfig.preset("tiny")
    model = build_model(config)
    experts = model.model.layers[1].mlp.experts
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    make_partly_trainable(experts, [2, 5], ["gate_up_proj", "down_proj"])
    with torch.no_grad():
        experts.providers.trainable.down_proj.add_(1.0)
    raw = model.state_dict()
    assert set(raw) - set(plain) == {f"model.layers.1.mlp.experts.providers.trainable.{t}"
                                     for t in ("gate_up_proj", "down_proj")}
    state = fold_weight_providers(model, dict(raw))
    assert set(state) == set(plain)
    assert torch.equal(state["model.layers.1.mlp.experts.down_proj"][[2, 5]],
                       plain["model.layers.1.mlp.experts.down_proj"][[2, 5]] + 1)
    model.save_pretrained(tmp_path)
    saved = seekmoe.from_pretrained(tmp_path).state_dict()
    assert torch.equal(saved["model.layers.1.mlp.experts.down_proj"], state["model.layers.1.mlp.experts.down_proj"])
    for source in (state, raw):  # plain stacks (a Hugging Face folder) or the raw state dict
        other = build_model(config)
        make_partly_trainable(other.model.layers[1].mlp.experts, [2, 5], ["gate_up_proj", "down_proj"])
        other.load_state_dict(source)
        assert torch.equal(other.model.layers[1].mlp.experts.providers.trainable.down_proj,
                           experts.providers.trainable.down_proj)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, other.eval()(ids).logits)


def test_trainable_rows_compose_with_a_provider_that_holds_a_slice_of_the_experts():
    """Expert parallelism's place in the chain, without processes: a provider handing on experts 4..7 only. The
    trainable rows of experts there are written in; the others get a zero gradient (another rank owns them)."""
    from dataclasses import replace

    from seekmoe.model.experts import RoutedExperts, WeightProvider
    from seekmoe.train.freeze import make_partly_trainable

    class SecondHalf(WeightProvider):
        order = 10

        def forward(self, w):
            return replace(w, gate_up_proj=w.gate_up_proj[4:], down_proj=w.down_proj[4:], first_expert=4)

    torch.manual_seed(0)
    experts = RoutedExperts(8, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    make_partly_trainable(experts, [2, 5], ["gate_up_proj", "down_proj"])
    experts.add_provider("shards", SecondHalf())
    assert list(experts.providers) == ["shards", "trainable"]
    rows = experts.providers.trainable
    with torch.no_grad():
        rows.down_proj.add_(1.0)
    gate_up, down = experts.expert_weights()
    assert torch.equal(down[1], experts.down_proj[5] + 1) and torch.equal(down[0], experts.down_proj[4])
    (gate_up.sum() + down.sum()).backward()
    assert rows.down_proj.grad[0].abs().sum() == 0 and rows.down_proj.grad[1].abs().sum() > 0
    assert experts.gate_up_proj.grad is None  # the stacks are frozen
