"""seekmoe analyze: every statistic checked on a constructed model whose routing is known in advance, the probes
against models built with the probed setting, and the command end to end (HTML + JSON)."""

import json
import math
import re
import sys

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.analysis import RoutingCapture, ablation_probes, analyze, route, routing_override
from seekmoe.analysis.probes import evaluate_loss
from seekmoe.analysis.sources import Source
from seekmoe.analysis.statistics import saturation
from seekmoe.cli import main

E, K, SCALE = 8, 2, 0.2  # experts, experts per token, router weight


def first(v: int) -> int:
    """The expert token v ranks first in the constructed model."""
    return v % E


def second(v: int) -> int:
    return (v + 1) % E


def constructed_model(shift: int = 0, shared: bool = True, routed: bool = True) -> seekmoe.CausalLM:
    """A tiny model with one MoE layer (block 1) whose input is the token's embedding: attention and the dense
    layer write nothing, embedding v = 1.0 at dim first(v) and 0.5 at dim second(v), and the router weight is
    SCALE x identity on the first E dims, rolled by `shift` experts. So token v routes to {first(v), second(v)}
    (shifted by -shift), first(v) with the larger weight."""
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
                                num_nextn_predict_layers=0, norm_topk_prob=True, routed_scaling_factor=1.0)
    model = seekmoe.build_model(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        emb = torch.zeros(config.vocab_size, config.hidden_size)
        v = torch.arange(config.vocab_size)
        emb[v, v % E] = 1.0
        emb[v, (v + 1) % E] = 0.5
        model.model.embed_tokens.weight.copy_(emb)
        moe = model.model.layers[1].mlp
        moe.gate.weight.zero_()
        moe.gate.weight[:, :E] = SCALE * torch.eye(E).roll(-shift, dims=0)
        if not shared:
            moe.shared_experts.down_proj.weight.zero_()
        if not routed:
            moe.experts.down_proj.zero_()
    return model


def router_probabilities(hidden: int = 64) -> torch.Tensor:
    """The softmax over experts every token gets (the same up to which experts): logits SCALE x RMSNorm(embedding)."""
    rms = math.sqrt((1.0 + 0.25) / hidden + 1e-6)
    logits = torch.zeros(E, dtype=torch.float64)
    logits[0], logits[1] = SCALE / rms, 0.5 * SCALE / rms
    return logits.softmax(0)


# Source A's tokens route first to experts 0 and 1, source B's to 4 and 5.
SEQ_A = [8, 8, 9, 16, 17, 17, 24, 25, 8, 9, 9, 16, 24, 24, 25, 17]
SEQ_B = [12, 13, 13, 20, 21, 12, 12, 28, 29, 13, 20, 21, 21, 28, 12, 29]


@pytest.fixture(scope="module")
def sources():
    return [Source("A", torch.tensor([SEQ_A, SEQ_A[::-1]])), Source("B", torch.tensor([SEQ_B, SEQ_B[::-1]]))]


@pytest.fixture(scope="module")
def model():
    return constructed_model()


class FakeTokenizer:
    def token_text(self, i):
        return f"<{i}>"

    def encode(self, text, add_bos=True):
        return [int(t) for t in text.split()]

    def pieces(self, ids):
        return [f"<{i}>" for i in ids]


def all_tokens(sources):
    return [t for s in sources for t in s.sequences.reshape(-1).tolist()]


def test_capture_records_the_experts_each_token_was_built_to_choose(model, sources):
    routed = route(model, sources, batch_size=3)
    (layer,) = routed.layers
    tokens = all_tokens(sources)
    assert layer.layer == 1 and routed.token_ids.tolist() == tokens
    assert [set(row) for row in layer.indices.tolist()] == [{first(v), second(v)} for v in tokens]
    top = layer.indices.gather(1, layer.weights.argmax(1, keepdim=True)).squeeze(1)
    assert top.tolist() == [first(v) for v in tokens]
    p = router_probabilities()
    assert torch.allclose(layer.weights.max(1).values.double(), p[0] / (p[0] + p[1]), atol=1e-5)
    assert layer.dropped_slots == 0


def test_dropped_share_counts_the_slots_a_capacity_limited_layer_reports(sources):
    model = constructed_model()
    moe = model.model.layers[1].mlp

    def drop_three(module, args, out):  # what a capacity-limited layer reports in its MoEStats
        out[1].dropped_slots = torch.tensor(3)

    handle = moe.register_forward_hook(drop_three)
    (s,) = analyze(model, FakeTokenizer(), sources, batch_size=4, probe_tokens=0)["layers"]
    handle.remove()
    forwards, tokens = 2, 64  # each source's 2 sequences of 16 tokens fit one forward
    assert s["dropped_share"] == pytest.approx(3 * forwards / (K * tokens))


def test_load_maxvio_entropy_and_dropped_share_match_hand_counts(model, sources):
    results = analyze(model, FakeTokenizer(), sources, batch_size=4, probe_tokens=0)
    (s,) = results["layers"]
    tokens = all_tokens(sources)
    counts = [0] * E
    for v in tokens:
        counts[first(v)] += 1
        counts[second(v)] += 1
    assert s["counts"] == counts
    assert s["load"] == pytest.approx([c / (K * len(tokens)) for c in counts])
    mean = sum(counts) / E
    assert s["max_vio"] == pytest.approx((max(counts) - mean) / mean)
    p = router_probabilities()
    assert s["routing_entropy"] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
    load = [c / sum(counts) for c in counts]
    assert s["load_entropy"] == pytest.approx(-sum(q * math.log(q) for q in load if q) / math.log(E))
    assert s["dropped_share"] == 0.0


def test_coactivation_and_consecutive_rates_match_hand_counts(model, sources):
    (s,) = analyze(model, FakeTokenizer(), sources, batch_size=4, probe_tokens=0)["layers"]
    tokens = all_tokens(sources)
    both = sum(1 for v in tokens if first(v) == 0)  # every token on 0 goes with 1
    on_1 = sum(1 for v in tokens if 1 in (first(v), second(v)))
    assert s["coactivation"]["conditional"][0][1] == pytest.approx(1.0)
    assert s["coactivation"]["conditional"][1][0] == pytest.approx(both / on_1)
    assert s["coactivation"]["conditional"][0][3] == 0.0
    pairs = [(seq[t], seq[t + 1]) for src in sources for seq in src.sequences.tolist() for t in range(len(seq) - 1)]
    same = sum(first(a) == first(b) for a, b in pairs) / len(pairs)
    overlap = sum(len({first(a), second(a)} & {first(b), second(b)}) / K for a, b in pairs) / len(pairs)
    c = s["consecutive"]
    assert c["pairs"] == len(pairs)  # never across the end of a sequence
    assert c["top1_same"] == pytest.approx(same) and c["topk_overlap"] == pytest.approx(overlap)


def test_domain_specialization_matches_each_sources_expert_shares(model, sources):
    (d,) = analyze(model, FakeTokenizer(), sources, batch_size=4, probe_tokens=0)["domain"]
    for i, src in enumerate(sources):
        tokens = src.sequences.reshape(-1).tolist()
        share = [sum(e in (first(v), second(v)) for v in tokens) / len(tokens) for e in range(E)]
        assert d["share"][i] == pytest.approx(share)
        assert d["ratio"][i] == pytest.approx([x / (K / E) for x in share])
        p = [x / K for x in share]
        assert d["tv_uniform"][i] == pytest.approx(0.5 * sum(abs(x - 1 / E) for x in p))
    # The sources use disjoint experts: each is half the pooled load, so half its mass sits elsewhere.
    assert d["tv_pooled"] == pytest.approx([0.5, 0.5])


def test_vocabulary_lists_each_experts_tokens_and_full_concentration(model, sources):
    (v,) = analyze(model, FakeTokenizer(), sources, batch_size=4, probe_tokens=0, min_count=2)["vocabulary"]
    tokens = all_tokens(sources)
    for e, entries in enumerate(v["experts"]):
        mine = [t for t in tokens if e in (first(t), second(t))]
        expected = sorted({t: mine.count(t) for t in mine}.items(), key=lambda kv: (-kv[1], kv[0]))
        assert [(x["token"], x["count"]) for x in entries] == expected[:8]
        assert all(x["of_token"] == 1.0 and x["text"] == f"<{x['token']}>" for x in entries)
    assert v["concentration_mean"] == 1.0 and v["concentration_random"] == K / E


def test_token_concentration_is_the_share_of_occurrences_holding_the_tokens_most_frequent_expert():
    from seekmoe.analysis.capture import LayerRouting
    from seekmoe.analysis.specialization import vocabulary_specialization

    indices = torch.tensor([[0, 1], [0, 2], [3, 4], [0, 5], [1, 2], [2, 1], [1, 2], [2, 1]])
    tokens = torch.tensor([5, 5, 5, 5, 6, 6, 6, 6])
    n = len(tokens)
    layer = LayerRouting(1, indices, torch.ones(n, 2) / 2, torch.zeros(n), 0, torch.zeros(n), torch.zeros(n))
    v = vocabulary_specialization(layer, tokens, E, min_count=4)
    assert v["concentration"] == [[6, 4, 1.0], [5, 4, 0.75]]
    assert v["concentration_mean"] == pytest.approx(0.875)
    assert [t["token"] for t in v["least_concentrated"]] == [5, 6]
    assert [(t["token"], t["count"], t["of_token"]) for t in v["experts"][0]] == [(5, 3, 0.75)]
    assert v["experts"][1][0]["of_expert"] == pytest.approx(4 / 5)  # 4 of expert 1's 5 slots are token 6


def test_shared_norm_share_is_zero_without_shared_output_and_one_without_routed(sources):
    assert analyze(constructed_model(shared=False), FakeTokenizer(), sources,
                   probe_tokens=0)["layers"][0]["shared_norm_share"] == 0.0
    assert analyze(constructed_model(routed=False), FakeTokenizer(), sources,
                   probe_tokens=0)["layers"][0]["shared_norm_share"] == 1.0


def test_shared_and_routed_norms_are_those_of_the_two_parts(model, sources):
    ids = sources[0].sequences[:1]
    moe = model.model.layers[1].mlp
    h = model.model.layers[1].post_attention_layernorm(model.model.embed_tokens(ids))
    with torch.no_grad(), RoutingCapture(model) as capture:
        model(ids)
        shared = moe.shared_experts(h)[0]
        total = moe(h)[0][0]
    (layer,) = capture.layers()
    assert torch.allclose(layer.shared_norm[:16], shared.norm(dim=-1), atol=1e-6)
    assert torch.allclose(layer.routed_norm[:16], (total - shared).norm(dim=-1), atol=1e-6)


def test_saturation_is_one_for_the_same_router_and_one_half_when_one_expert_of_two_moves(model, sources):
    shifted = constructed_model(shift=1)  # token v now routes to {first(v) - 1, first(v)}: one expert in common
    assert analyze(model, FakeTokenizer(), sources, compare=model, probe_tokens=0)["saturation"]["mean"] == 1.0
    final, earlier = route(model, sources, 4).layers[0], route(shifted, sources, 4).layers[0]
    assert saturation(earlier, final, E) == pytest.approx(0.5)


def test_disabling_the_top_r_experts_reroutes_to_the_next_best(model, sources):
    tokens = all_tokens(sources)
    with routing_override(model, skip_top=1):
        (layer,) = route(model, sources, 4).layers
    assert all(first(v) not in row and second(v) in row for v, row in zip(tokens, layer.indices.tolist()))
    with routing_override(model, skip_top=2):
        (layer,) = route(model, sources, 4).layers
    assert all(not {first(v), second(v)} & set(row) for v, row in zip(tokens, layer.indices.tolist()))
    (layer,) = route(model, sources, 4).layers  # hooks gone on exit
    assert [set(r) for r in layer.indices.tolist()] == [{first(v), second(v)} for v in tokens]


def test_top_k_probe_equals_a_model_built_with_that_k_and_shared_off_zeroes_the_shared_output(model, sources):
    results = ablation_probes(model, sources, batch_size=4)
    assert set(results["skip_top"]) == {1, 2} and set(results["top_k"]) == {1, 2, 3, 4}
    assert results["top_k"][2] == results["baseline"] == pytest.approx(evaluate_loss(model, sources, 4))
    for k in (1, 3):
        other = seekmoe.build_model(model.config.replace(num_experts_per_tok=k)).eval()
        other.load_state_dict(model.state_dict())
        assert results["top_k"][k] == pytest.approx(evaluate_loss(other, sources, 4), abs=1e-6)
    no_shared = constructed_model(shared=False)
    assert results["no_shared"] == pytest.approx(evaluate_loss(no_shared, sources, 4), abs=1e-6)
    with routing_override(model, shared=False):
        assert float(route(model, sources, 4).layers[0].shared_norm.abs().max()) == 0.0


def test_disabled_experts_stay_out_under_group_limited_routing(sources):
    torch.manual_seed(1)
    grouped = seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0)).eval()  # 2 of 4 groups
    scores = []
    handle = grouped.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: scores.append(out.scores))
    with routing_override(grouped, skip_top=2):
        (skipped,) = route(grouped, sources, 4).layers
    handle.remove()
    best = torch.cat(scores).topk(2, dim=1).indices  # bias 0: the router ranks experts by their scores
    assert not (skipped.indices[:, :, None] == best[:, None, :]).any()


def test_probe_settings_a_token_cannot_reach_are_refused(sources):
    grouped = seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0)).eval()  # 2 of 4 groups
    for top_k, skip_top in ((3, 2), (0, 0), (5, 0)):
        with pytest.raises(ValueError, match=f"top_k={top_k} with skip_top={skip_top}"):
            with routing_override(grouped, top_k=top_k, skip_top=skip_top):
                pass
    assert set(ablation_probes(grouped, sources, 4)["top_k"]) == {1, 2, 3, 4}


def test_a_model_without_shared_experts_has_no_shared_share_and_skips_that_probe(sources):
    model = seekmoe.build_model(ModelConfig.preset("tiny", n_shared_experts=0, num_nextn_predict_layers=0)).eval()
    results = analyze(model, FakeTokenizer(), sources, probe_tokens=16)
    assert results["layers"][0]["shared_norm_share"] == 0.0
    assert "no_shared" not in results["probes"] and results["probes"]["tokens"] == 32


def test_prompt_view_marks_each_token_with_its_experts(model):
    view = analyze(model, FakeTokenizer(), [Source("A", torch.tensor([SEQ_A]))], prompt="8 9 17",
                   probe_tokens=0)["prompt"]
    assert [t["id"] for t in view["tokens"]] == [8, 9, 17]
    assert [t["layers"][0]["experts"] for t in view["tokens"]] == [[0, 1], [1, 2], [1, 2]]
    assert all(w[0] > w[1] for w in (t["layers"][0]["weights"] for t in view["tokens"]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_inference_tokenizer import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("analyze_model"))


def test_analyze_command_writes_a_self_contained_report_and_every_number_as_json(model_dir, tmp_path, capsys):
    code_file, prose = tmp_path / "code.py", tmp_path / "prose.txt"
    code_file.write_text("def f(x):\n    return [x * i for i in range(10)]\n" * 12)
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "report"
    assert main(["analyze", "--model", str(model_dir), "--data", str(code_file), str(prose), "--out", str(out),
                 "--prompt", "def g(y): return y", "--compare", str(model_dir), "--max-tokens", "200",
                 "--seq-len", "32", "--probe-tokens", "64", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    results = json.loads((out / "analysis.json").read_text())
    assert [s["tokens"] for s in results["sources"]] == [192, 192]
    assert results["saturation"]["mean"] == 1.0
    assert sum(results["layers"][0]["load"]) == pytest.approx(1.0)
    assert set(results["probes"]) >= {"baseline", "skip_top", "no_shared", "top_k"}
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # nothing fetched
    for heading in ("Expert load", "Domain specialization", "Vocabulary specialization", "Co-activation",
                    "Token-level view", "Router saturation", "Ablation probes"):
        assert heading in page
    assert results["definitions"]["max_vio"] in page.replace("&#x27;", "'")


def test_analyze_reports_bad_arguments_as_clean_errors(model_dir, tmp_path, capsys):
    assert main(["analyze", "--model", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["analyze", "--model", str(model_dir), "--data", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
