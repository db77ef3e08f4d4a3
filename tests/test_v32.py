"""DeepSeek-V3.2 (model_type deepseek_v32): the lightning indexer and sparse MLA against transformers, its decoding
cache, its training stages, presets and hostile configs."""

import copy
import json
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from hf_oracle import hf_model, rel_error

TOPK = 5  # shorter than every test sequence: attention is sparse
# (8 indexer heads: a token all of whose heads' ReLUs are zero, scoring exactly 0, is rare; exact ties are where
# transformers' torch.topk and seekmoe's stable choice of the earlier token may differ)


def hf_v32_config(**overrides):
    """A transformers DeepseekV32Config small enough for CPU tests."""
    from transformers import DeepseekV32Config

    settings = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                    index_topk=TOPK, index_head_dim=16, index_n_heads=8, initializer_range=0.1,
                    max_position_embeddings=128, tie_word_embeddings=False)
    settings.update(overrides)
    return DeepseekV32Config(**settings)


def hf_v32_model(seed: int = 0, **overrides):
    """A random transformers V3.2 model with a non-trivial indexer key norm (weight and bias)."""
    model = hf_model(hf_v32_config(**overrides), seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".indexer.k_norm." in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def v32_folder(tmp_path_factory):
    """(a transformers V3.2 model, the folder it saved)."""
    path = tmp_path_factory.mktemp("v32")
    reference = hf_v32_model()
    reference.save_pretrained(path)
    return reference, path


def test_a_transformers_v32_folder_loads_with_its_logits_on_sequences_longer_than_index_topk(v32_folder):
    reference, path = v32_folder
    ours = seekmoe.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.config.model_type == "deepseek_v32" and ours.config.index_topk == TOPK
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 4 * TOPK))
    with torch.no_grad():
        logits = ours(ids).logits
        assert rel_error(logits, reference(ids).logits) < 2e-4
        # ...and the indexer's choice mattered: dense MLA over the same weights is far off
        for layer in ours.model.layers:
            layer.self_attn.index_topk = 10 ** 6
        assert rel_error(ours(ids).logits, logits) > 1e-2


def test_a_yarn_scaled_v32_folder_loads_with_its_logits(tmp_path):
    """YaRN's frequencies and cos/sin scale reach the indexer's rotation as they reach MLA's."""
    from hf_oracle import YARN

    reference = hf_v32_model(seed=3, rope_parameters=dict(YARN), num_hidden_layers=2)
    reference.save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours.config.rope_scaling["factor"] == YARN["factor"]
    ids = torch.randint(0, 97, (1, 6 * TOPK), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, reference(ids).logits) < 2e-4

def test_save_then_transformers_reloads_the_same_logits(v32_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    reference, path = v32_folder
    seekmoe.from_pretrained(path, dtype=torch.float32).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # no layer_types: all sparse by default in every transformers version, whose names for the kind differ
    assert saved["model_type"] == "deepseek_v32" and "layer_types" not in saved
    assert saved["mlp_layer_types"] == ["dense", "sparse", "sparse"] and "rope_interleave" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids = torch.randint(0, 97, (1, 3 * TOPK))
    with torch.no_grad():
        assert rel_error(reloaded(ids).logits, reference(ids).logits) < 1e-6



@pytest.mark.parametrize("prefill", [64, 3])  # one chunk, and chunks of 3 (the indexer keys cached chunk by chunk)
def test_greedy_decoding_through_seekmoes_caches_equals_transformers_generate(v32_folder, prefill):
    from seekmoe.inference import Engine, SamplingParams

    reference, path = v32_folder
    engine = Engine(seekmoe.from_pretrained(path, dtype=torch.float32), None, max_batch_size=2,
                    max_seq_len=64, max_prefill_tokens=prefill)
    # in one batch: a prompt longer than index_topk, and one that outgrows it while decoding
    prompts = [[0, 5, 9, 13, 2, 7, 30, 31, 8, 60, 61], [0, 40, 41]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    ours = engine.generate(prompts, greedy)
    assert [r.output_ids for r in engine.generate(prompts[1:], greedy)] == [ours[1].output_ids]  # batch or alone
    reference = copy.deepcopy(reference)
    reference.generation_config.eos_token_id = None  # no stop, as ignore_eos
    for prompt, request in zip(prompts, ours):
        theirs = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=12, do_sample=False)
        assert request.output_ids == theirs[0, len(prompt):].tolist()

def test_v3_configs_keep_no_indexer_keys():
    saved = ModelConfig.preset("tiny").to_dict()
    assert saved["model_type"] == "deepseek_v3" and not {"index_topk", "layer_types"} & set(saved)


@pytest.mark.parametrize("field, value", [("index_topk", 0), ("index_topk", -3), ("index_topk", True),
                                          ("index_topk", "8"), ("index_n_heads", 0), ("index_head_dim", 4),
                                          ("q_lora_rank", None), ("scoring_func", "softmax"),
                                          ("rope_interleave", False)])
def test_hostile_v32_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        ModelConfig.preset("tiny-v32", **{field: value})


@pytest.mark.parametrize("key, value", [("layer_types", ["indexed_attention", "sliding_attention", "x"]),
                                        ("layer_types", ["indexed_attention"]),
                                        ("mlp_layer_types", ["sparse", "dense", "sparse"]),
                                        ("mlp_layer_types", ["dense", "moe", "moe"]),
                                        ("index_topk", 0)])
def test_hostile_v32_config_json_names_the_field(key, value):
    d = hf_v32_config().to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=f"ModelConfig.{key}="):
        ModelConfig.from_dict(d)


def test_layer_types_as_older_transformers_write_them_are_read():
    """transformers 5.17 (the oldest supported) names V3.2's layer kind 'deepseek_sparse_attention', 5.25
    'indexed_attention': both read as the same model."""
    d = hf_v32_config().to_dict()
    new = ModelConfig.from_dict(d)
    d["layer_types"] = ["deepseek_sparse_attention"] * d["num_hidden_layers"]
    assert ModelConfig.from_dict(d) == new


def tiny_v32(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    # a wide initialization: peaked attention, so the indexer has a distribution to learn
    settings = {"num_nextn_predict_layers": 0, "initializer_range": 0.2, **overrides}
    return seekmoe.build_model(ModelConfig.preset("tiny-v32", **settings))


def test_the_dsa_warmup_lowers_the_indexers_kl_and_moves_nothing_else():
    from seekmoe.train.freeze import select_trainable
    from seekmoe.train.indexer_warmup import indexer_objective

    model = tiny_v32().train()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    select_trainable(model, "indexer")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".indexer." in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    objective = indexer_objective("warmup")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    kls = []
    for _ in range(8):
        out = objective(model, ids, torch.device("cpu"), None)
        kls.append(out.metrics["indexer_kl"].item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert kls[-1] < 0.7 * kls[0], kls
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]) == (".indexer." not in name), name


def test_in_the_sparse_stage_the_lm_loss_trains_the_model_and_the_kl_the_indexer_alone():
    from seekmoe.model.sparse_attention import indexer_modules
    from seekmoe.train.indexer_warmup import indexer_objective

    model = tiny_v32(num_nextn_predict_layers=1).train()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    out = indexer_objective("sparse")(model, ids, torch.device("cpu"), None)
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss + out.balance_loss + out.metrics["indexer_kl"])

    layers = indexer_modules(model)
    assert len(layers) == 3  # the MTP layer's attention is sparse too
    out = model(ids, labels=ids)  # the layers keep the stage the objective set
    kl = torch.stack([layer.indexer_loss for layer in layers]).mean()
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    main = [p for n, p in model.named_parameters() if ".indexer." not in n]
    lm_grads = torch.autograd.grad(out.loss, indexer + main, allow_unused=True, retain_graph=True)
    assert all(g is None for g in lm_grads[:len(indexer)])
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in lm_grads[len(indexer):]) > len(main) // 2
    kl_grads = torch.autograd.grad(kl, indexer + main, allow_unused=True)
    assert all(g is not None for g in kl_grads[:len(indexer)])
    assert all(g is None for g in kl_grads[len(indexer):])


def _cli_train(argv: list[str], corpus, cache) -> list[dict]:
    """Run `seekmoe train ARGV` on the test corpus (tiny sequences, fp32); its metrics.jsonl step records."""
    from seekmoe.cli import main

    out = argv[argv.index("--out") + 1]
    assert main(["train", *argv, f"cache_dir={cache}", "seq_len=32", "batch_size=4", "eval_every=100",
                 "precision=fp32", "num_threads=1", "--data", str(corpus), "--no-progress"]) == 0
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "lm_loss" in r]


@pytest.fixture(scope="module")
def pretrained_v32(tmp_path_factory, corpus, cache):
    """A tiny-v32 model pretrained for 2 steps: (its final/ folder, its step records)."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    records = _cli_train(["--preset", "tiny-v32", "--out", str(out), "--max-steps", "2"], corpus, cache)
    return out / "final", records


def test_pretraining_tiny_v32_trains_its_indexers_and_the_warmup_lowers_their_kl(pretrained_v32, tmp_path,
                                                                                 corpus, cache):
    base, records = pretrained_v32
    assert len(records) == 2 and all(r["indexer_kl"] > 0 for r in records)
    records = _cli_train(["--init-from", str(base), "--dsa-stage", "warmup", "--out", str(tmp_path / "warm"),
                          "--max-steps", "4", "lr=1e-2"], corpus, cache)
    kls = [r["indexer_kl"] for r in records]
    assert len(kls) == 4 and kls[-1] < kls[0]
    before, after = seekmoe.from_pretrained(base), seekmoe.from_pretrained(tmp_path / "warm" / "final")
    for (name, p), q in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(p, q) == (".indexer." not in name), name


def test_the_warmup_adds_new_indexers_to_a_v3_model(pretrained_v32, tmp_path, corpus, cache):
    v3 = tiny_v32(index_topk=None)  # DeepSeek-V3.2 was made from V3.1 so
    v3.save_pretrained(tmp_path / "v3")
    (tmp_path / "v3" / "tokenizer.json").write_bytes((pretrained_v32[0] / "tokenizer.json").read_bytes())
    records = _cli_train(["--init-from", str(tmp_path / "v3"), "--dsa-stage", "warmup", "--out",
                          str(tmp_path / "warm"), "--max-steps", "2", "index_topk=8", "index_n_heads=2",
                          "index_head_dim=16"], corpus, cache)
    assert len(records) == 2 and records[0]["indexer_kl"] > 0.01  # a fresh indexer, far from the attention
    warmed = seekmoe.from_pretrained(tmp_path / "warm" / "final")
    assert warmed.config.model_type == "deepseek_v32"
    state = warmed.state_dict()
    assert any(".indexer." in name for name in state)
    for name, p in v3.state_dict().items():
        assert torch.equal(p, state[name]), name


def test_the_dsa_stages_refuse_a_model_without_an_indexer(tmp_path, capsys):
    from seekmoe.cli import main

    seekmoe.build_model(ModelConfig.preset("tiny")).save_pretrained(tmp_path / "v3")
    assert main(["train", "--init-from", str(tmp_path / "v3"), "--dsa-stage", "warmup",
                 "--out", str(tmp_path / "run")]) == 2
    assert "index_topk" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny-v32", "--dsa-stage", "sparse", "--out", str(tmp_path / "run")]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_info_counts_deepseek_v32_as_v3_plus_its_indexers_and_their_key_cache():
    from seekmoe.info import model_summary

    # at 128K tokens of context (the counts do not depend on it)
    v3 = model_summary(ModelConfig.preset("deepseek-v3"), context=131072)
    v32 = model_summary(ModelConfig.preset("deepseek-v3.2"), context=131072)
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64  # wq_b, wk, k_norm, weights_proj
    assert v32["total_params"] - v3["total_params"] == 61 * per_layer
    assert v32["active_params"] - v3["active_params"] == 61 * per_layer  # every token runs every indexer
    assert 671e9 < v32["total_params"] < 673e9 and 37e9 < v32["active_params"] < 39e9
    assert v32["indexer_cache_bytes_per_token"] == 61 * 128 * 2 and v3["indexer_cache_bytes_per_token"] == 0
    assert v32["kv_cache_bytes_per_token"] == v3["kv_cache_bytes_per_token"] + 61 * 128 * 2
    # attention over 2048 keys costs far less than over all of them, the indexer's scan included
    assert v32["flops_per_token"] < 0.5 * v3["flops_per_token"]


@pytest.mark.slow  # a minute of graph capture on 2 busy cores
def test_compiled_decoding_with_mtp_drafts_gives_the_eager_tokens(monkeypatch):
    """Graph capture (aot_eager) of the decode, verify and draft forwards, with the CUDA path's static shapes (a
    padded batch, full-length cache reads whose mask hides the empty columns): the top-k is tensor-only."""
    from torch._dynamo.utils import counters

    from seekmoe.inference import Engine, SamplingParams, compiled

    model = tiny_v32(num_nextn_predict_layers=1).eval()
    prompts = [[0, 5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 40]]  # longer and shorter than index_topk=8
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    want = [r.output_ids for r in Engine(model, max_batch_size=3, speculative="mtp", compile=False,
                                         max_seq_len=64).generate(prompts, greedy)]
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, max_batch_size=3, speculative="mtp", compile=True, max_seq_len=64)
    engine.forwards.static = True
    assert [r.output_ids for r in engine.generate(prompts, greedy)] == want
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow  # a torchrun launch
def test_tiny_v32_trains_under_expert_parallelism_with_the_losses_of_one_process(tmp_path, corpus, cache):
    from test_distributed import WORKER, assert_same_losses, torchrun

    one = _cli_train(["--preset", "tiny-v32", "--out", str(tmp_path / "one"), "--max-steps", "3"], corpus, cache)
    job = ["train", "--preset", "tiny-v32", "--out", str(tmp_path / "ep2"), "--max-steps", "3", f"cache_dir={cache}",
           "seq_len=32", "batch_size=2", "eval_every=100", "precision=fp32", "num_threads=1", "parallel.ep=2",
           "--data", str(corpus), "--no-progress"]  # the same global batch of 4 sequences
    torchrun(2, WORKER, "matrix", json.dumps([job]), timeout=600)
    lines = (tmp_path / "ep2" / "metrics.jsonl").read_text().splitlines()
    ep2 = [r for r in map(json.loads, lines) if "lm_loss" in r]
    assert_same_losses([r["loss"] for r in ep2], [r["loss"] for r in one])
    assert_same_losses([r["indexer_kl"] for r in ep2], [r["indexer_kl"] for r in one])


@torch.no_grad()
def test_decoding_attends_to_the_gathered_top_k_as_the_masked_attention_does():
    from seekmoe.model.indexer import select_top_k, top_k_tokens

    attention = tiny_v32().model.layers[1].self_attn
    B, S, T, h, k = 3, 2, 30, 4, attention.index_topk
    q_nope, q_pe = torch.randn(B, S, h, 16), torch.randn(B, S, h, 8)
    c_kv, k_pe = torch.randn(B, T, 32), torch.randn(B, T, 8)
    scores = torch.randn(B, S, T).relu()  # many exact zeros: ties
    allowed = torch.arange(T) <= torch.tensor([[[[4], [5]]], [[[20], [21]]], [[[28], [29]]]])  # [B, 1, S, T]
    chosen = top_k_tokens(scores, allowed, k)
    gathered = attention.attend_selected(q_nope, q_pe, c_kv, k_pe, chosen, allowed)
    masked = attention.attend_latent(q_nope, q_pe, c_kv, k_pe, select_top_k(scores, allowed, k))
    assert rel_error(gathered, masked) < 1e-5
    # ties go to the earlier token, whatever the row's length
    assert torch.equal(top_k_tokens(scores[..., :22], allowed[..., :22], k)[1], chosen[1])


def test_the_decoding_cache_holds_what_info_counts_the_indexer_key_beside_the_latent():
    from seekmoe.inference import DecodeCache
    from seekmoe.info import model_summary

    model = tiny_v32()
    cache = DecodeCache.for_model(model, 2, 16, torch.float32)
    assert set(cache.tensors[0]) == {"c_kv", "k_pe", "index_k"} and cache.tensors[0]["index_k"].shape == (2, 17, 16)
    summary = model_summary(model.config, cache_dtype="float32")
    assert cache.bytes_per_token() == summary["kv_cache_bytes_per_token"] == (32 + 8 + 16) * 2 * 4


@torch.no_grad()
def test_the_indexer_scores_long_sequences_a_few_queries_at_a_time_with_the_same_result(monkeypatch):
    from seekmoe.model import indexer as indexer_module

    model = tiny_v32()
    indexer = model.model.layers[0].self_attn.indexer
    x, q_latent, keys = torch.randn(2, 40, 64), torch.randn(2, 40, 32), torch.randn(2, 40, 16)
    cos, sin = model.model.rotary_emb(torch.arange(40))
    whole = indexer(x, q_latent, keys, cos, sin)
    monkeypatch.setattr(indexer_module, "SCORE_CHUNK_BYTES", 4 * 2 * 2 * 40 * 7)  # 7 queries a chunk
    assert torch.allclose(indexer(x, q_latent, keys, cos, sin), whole, rtol=1e-6, atol=1e-7)
