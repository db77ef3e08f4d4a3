"""DeepSeek-V4 beyond its forward: SFT (one example a row: its compressed keys cannot respect a packed mask)."""

from __future__ import annotations

import json

import pytest
import torch

from seekmoe import from_pretrained
from seekmoe.cli import main
from seekmoe.inference.tokenizer import Tokenizer
from seekmoe.posttrain.demo import make_base_model
from seekmoe.posttrain.sft_data import collate, render_example, sft_forward

PAIRS = [("What is the capital of Arvelia?", "Tosk"), ("Name the capital of Brimora.", "Quill"),
         ("Which city is the capital of Caldor?", "Vemm"), ("Dunwich: capital?", "Orra")]


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    """The runs here ask for num_threads=1; the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sft_of_a_v4_model_takes_one_example_a_row_and_lowers_its_loss(tmp_path, capsys):
    records = [{"prompt": p, "completion": c} for p, c in PAIRS] * 6
    texts = [f"User: {r['prompt']}\n\nAssistant: {r['completion']}" for r in records]
    # index_topk=16 >= 40 / 4 windows: the indexer's choice never binds here. Where it binds, ReLU's exact ties (score
    # 0) are broken by topk as transformers breaks them, which depends on the row's length: padding may then pick
    # another of the tied windows.
    base = make_base_model(tmp_path / "base", texts, preset="tiny-v4", vocab_size=300, index_topk=16)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    assert main(["sft", "--model", str(base), "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
                 "--max-steps", "12", "--no-progress", "lr=5e-3", "seq_len=40", "batch_size=4", "warmup_steps=1",
                 "precision=fp32", "num_threads=1", "eval_every=12", "save_every=12", "val_fraction=0"]) == 0
    assert "SFT examples one a row" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses

    # The loss SFT computes on an example (a padded row, no attn_mask) is the model's plain forward on it.
    model, tok = from_pretrained(out / "final").eval(), Tokenizer(out / "final")
    ex = render_example(records[1], tok)
    batch = collate([[ex]], 40, tok.eos_token_id, packed=False)
    assert batch.attn_mask is None and batch.input_ids.shape == (1, 40) and len(ex.ids) < 40
    with torch.no_grad():
        got = sft_forward(model, batch, torch.device("cpu"), None).lm_loss
        want = model(torch.tensor([ex.ids]), labels=torch.tensor([ex.labels])).lm_loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v4"])
def test_a_model_materialized_from_a_folder_holds_nothing_to_empty_left(preset, tmp_path, monkeypatch):
    """The trainer's path for --init-from / SFT: a meta model filled from a folder. to_empty's memory is made NaN here
    so that a tensor nothing wrote (V4's rope frequencies once: a NaN or slightly-off loss from run to run) shows."""
    from torch import nn

    from seekmoe import ModelConfig, build_model
    from seekmoe.parallel.materialize import materialize

    to_empty = nn.Module.to_empty

    def poisoned(module, *, device, recurse=True):
        module = to_empty(module, device=device, recurse=recurse)
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
        return module

    config = ModelConfig.preset(preset)
    torch.manual_seed(0)
    build_model(config).save_pretrained(tmp_path)
    want = from_pretrained(tmp_path)
    monkeypatch.setattr(nn.Module, "to_empty", poisoned)
    got = materialize(build_model(config, device="meta"), torch.device("cpu"), tmp_path)
    wanted = dict(want.named_buffers()) | dict(want.named_parameters())
    for name, t in [*got.named_buffers(), *got.named_parameters()]:
        assert torch.equal(t, wanted[name]), name


@pytest.mark.slow  # test_families_integration compares compiled and eager V4 generation in the default suite
def test_compiled_v4_decoding_gives_eager_greedy_tokens(monkeypatch):
    """The Engine's compiled decode step (fullgraph: a graph break is an error) on V4's per-token caches, past a
    CSA and an HCA window closing mid-decoding (aot_eager: the graphs inductor would compile, captured fast)."""
    from torch._dynamo.utils import counters

    from seekmoe import ModelConfig
    from seekmoe.inference import Engine, SamplingParams, compiled
    from seekmoe.model import CausalLM

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.preset("tiny-v4", num_hidden_layers=3)).eval()
    prompt = [torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(3)).tolist()]
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)  # to 21 tokens: the HCA window at 16
    want = [r.output_ids for r in Engine(model, max_batch_size=1, compile=False).generate(prompt, greedy)]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, max_batch_size=1, compile=True)
    assert [r.output_ids for r in engine.generate(prompt, greedy)] == want
    assert engine.forwards.compile_seconds > 0 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow  # test_families_integration runs V4 under torchrun with ep=2 against one process by default
def test_expert_parallel_training_of_tiny_v4_reproduces_one_process(corpus, cache, tmp_path):
    """torchrun with 2 processes, ep=2 (the hash-routed first layer's experts split too): the losses of 3 steps
    within 1e-4 of one process's."""
    from test_distributed import WORKER, torchrun

    from seekmoe.train import load_run_config
    from seekmoe.train.metrics import read_metrics
    from seekmoe.train.trainer import Trainer

    def run_settings(per_rank_batch: int, **extra) -> dict:
        return {"seq_len": 32, "batch_size": per_rank_batch, "max_steps": 3, "warmup_steps": 1, "eval_every": 3,
                "save_every": 3, "eval_batches": 1, "cache_dir": cache, "precision": "fp32", "lr": 3e-3,
                "bias_update_speed": 0.01, **extra}

    model_config, config = load_run_config("tiny-v4", overrides=run_settings(4))
    Trainer(model_config, config, tmp_path / "one", data=[str(corpus)], progress=False).run()
    torchrun(2, WORKER, "train", str(tmp_path / "two"), str(corpus),
             json.dumps({**run_settings(2, parallel={"ep": 2}), "preset": "tiny-v4"}))
    want = [r["loss"] for r in read_metrics(tmp_path / "one")]
    got = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(got) == len(want) == 3
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"


@pytest.mark.parametrize("prefill,steps", [(37, 0), (37, 3), (64, 1), (9, 12)])
def test_info_counts_the_bytes_the_compact_v4_cache_allocates(prefill, steps):
    """`seekmoe info`'s V4 arithmetic (v4_cache_bytes) against the storage the per-layer caches keep alive, counted
    here from the tensors (each storage once): right after a prefill (where a kept slice would pin the prefill's
    projections) and after decoding steps, windows open and closed."""
    from seekmoe import ModelConfig
    from seekmoe.info import v4_cache_bytes
    from seekmoe.model import CausalLM
    from seekmoe.model.v4_cache import V4LayerCache

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.preset("tiny-v4", num_nextn_predict_layers=0)).eval()
    caches = [V4LayerCache(model.config.sliding_window) for _ in model.model.layers]
    ids = torch.randint(0, 512, (2, prefill + steps), generator=torch.Generator().manual_seed(prefill))
    with torch.no_grad():
        model(ids[:, :prefill], position_ids=torch.arange(prefill), cache=caches)
        for t in range(prefill, prefill + steps):
            model(ids[:, t:t + 1], position_ids=torch.tensor([t]), cache=caches)
    storages = {}
    for c in caches:
        for t in [c.window, *(x for s in (c.compressor, c.indexer) for x in (s.kv, s.gate, s.keys, *(s.prior or ())))]:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    want = v4_cache_bytes(model.config, prefill + steps, 4) * 2  # fp32, a batch of 2
    assert sum(storages.values()) == want == sum(c.nbytes() for c in caches)


def trained_like_v4(input_scale: float = 1.0):
    """A random tiny-v4 whose learned routers' biases are spread, as after training; its MoE inputs `input_scale`
    times larger (the norms' weights: at 100 a random router row's sqrtsoftplus score passes the bias margin)."""
    from seekmoe import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny-v4")).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("post_attention_layernorm"):
                module.weight.mul_(input_scale)
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def test_zero_expansion_of_a_v4_model_keeps_its_outputs_exactly():
    """sqrtsoftplus scores are unbounded: the added experts' zero router rows score sqrt(softplus(0)) for every token,
    so the bias margin keeps them out of every top-k; the hash layer keeps its table, its added experts dormant."""
    from seekmoe.grow import GrowRecord, expand_model

    model = trained_like_v4(input_scale=100)
    grown, report = expand_model(model, 8, init="zero")
    assert report.exact and not report.changes
    assert report.notes and "model.layers.0.mlp is hash-routed" in report.notes[0] and "no tokens" in report.notes[0]
    record = GrowRecord.of(grown.config)
    assert "model.layers.0.mlp" in record.dormant and "model.layers.1.mlp" in record.new
    assert torch.equal(grown.model.layers[0].mlp.gate.tid2eid, model.model.layers[0].mlp.gate.tid2eid)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old, new = model(ids, labels=ids, mtp=True), grown(ids, labels=ids, mtp=True)
    assert new.expert_counts[:, 8:].sum() == 0
    torch.testing.assert_close(new.logits, old.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(new.mtp_loss, old.mtp_loss, rtol=0, atol=1e-6)
    assert all(torch.all(moe.gate.weight[8:] == 0) for moe in grown.moe_layers())  # zero rows, not random ones


def test_copy_expansion_of_a_v4_model_can_rehash_a_share_of_each_copied_experts_tokens():
    """--init copy --rehash 0.5: half of the token-table entries naming each copied expert name its copy instead (a
    token's experts stay distinct), the added experts get tokens in the hash layer too, and the output moves only by
    the copies' noise in that layer (against the same copy expansion without --rehash)."""
    from seekmoe.grow import expand_model
    from seekmoe.grow.expand import plan_layout

    model = trained_like_v4()
    layout = plan_layout(model.config, 8)
    keep, added = torch.tensor(layout.old_to_new), torch.tensor(layout.added)
    old_table = keep[model.model.layers[0].mlp.gate.tid2eid]
    plain, _ = expand_model(model, 8, init="copy")
    grown, report = expand_model(model, 8, init="copy", rehash=0.5)
    assert torch.equal(plain.model.layers[0].mlp.gate.tid2eid, old_table)
    table = grown.model.layers[0].mlp.gate.tid2eid
    changed = table != old_table
    assert torch.equal(table[changed], added[torch.searchsorted(keep, old_table[changed])])  # each to its source's copy
    for j, src in zip(layout.added, layout.source):
        assert int((table == j).sum()) == round(0.5 * int((old_table == keep[src]).sum()))
    assert all(len(set(row)) == len(row) for row in table.tolist())
    assert "of its token table's" in report.notes[0] and "model.layers.0.mlp" in report.layers
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old, new = plain(ids, labels=ids), grown(ids, labels=ids)
    assert old.expert_counts[0, added].sum() == 0 and new.expert_counts[0, added].sum() > 0
    assert 0 < float((new.logits - old.logits).abs().max() / old.logits.abs().max()) < 0.01


def test_expand_refuses_a_rehash_that_would_change_a_zero_expansion_or_has_nothing_to_rehash():
    from seekmoe import ModelConfig, build_model
    from seekmoe.grow import expand_model

    with pytest.raises(ValueError, match="--rehash 0.5 needs --init copy"):
        expand_model(trained_like_v4(), 8, init="zero", rehash=0.5)
    with pytest.raises(ValueError, match=r"--rehash 1.5 is invalid: expected a fraction in \[0, 1\]"):
        expand_model(trained_like_v4(), 8, init="copy", rehash=1.5)
    with pytest.raises(ValueError, match="no hash-routed layers"):
        expand_model(build_model(ModelConfig.preset("tiny")), 4, init="copy", rehash=0.5)
