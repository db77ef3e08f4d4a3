"""seekmoe analyze per modality: on a constructed model whose routing is known (token v -> experts v % 8 and
(v + 1) % 8, from test_analyze.py) each modality's load, the specialization score, the Jensen-Shannon divergence and
MaxVio match hand counts; a modality-routed model's two modalities use disjoint experts; and the command writes the
`modality` entry and its report section from a token-id JSONL."""

import json
import sys
from pathlib import Path

import pytest
import torch

from seekmoe import ModelConfig, build_model
from seekmoe.analysis import analyze, route
from seekmoe.analysis.modality import js_divergence, modality_report, specialization_scores
from seekmoe.analysis.sources import Source
from seekmoe.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_analyze import FakeTokenizer, constructed_model  # noqa: E402

IMAGE = 10  # routes to experts 2 and 3 in the constructed model
# Text tokens 8 (experts 0, 1) and 11 (experts 3, 4): expert 3 is shared by both modalities.
STREAM = [8, IMAGE, IMAGE, 11, 8, 8, IMAGE, 11, IMAGE, IMAGE, 8, 11, 8, IMAGE, 11, 8]


@pytest.fixture(scope="module")
def routed():
    model = constructed_model()
    sources = [Source("mixed", torch.tensor([STREAM, STREAM[::-1]]))]
    return model, sources, route(model, sources, batch_size=2)


def test_js_divergence_and_specialization_match_hand_values():
    one, half = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    assert js_divergence(one, one) == 0.0
    assert js_divergence(one, torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    # M = (.75, .25): KL(P||M) = log2(4/3), KL(Q||M) = .5 log2(2/3) + .5 log2 2
    expected = 0.5 * (torch.tensor(4 / 3).log2() + 0.5 * torch.tensor(2 / 3).log2() + 0.5)
    assert js_divergence(one, half) == pytest.approx(float(expected))
    s = specialization_scores(torch.tensor([0.5, 0.25, 0.0, 0.0]), torch.tensor([0.0, 0.25, 0.5, 0.0]))
    assert s.tolist() == [1.0, 0.0, -1.0, 0.0]


def test_each_modalitys_load_specialization_and_maxvio_match_hand_counts(routed):
    model, sources, r = routed
    report = modality_report(r.layers, r.token_ids, IMAGE, 8)
    n_image, n_text = STREAM.count(IMAGE) * 2, (len(STREAM) - STREAM.count(IMAGE)) * 2
    assert report["tokens"] == {"image": n_image, "text": n_text}
    (layer,) = report["layers"]
    assert layer["counts"]["image"] == [0, 0, n_image, n_image, 0, 0, 0, 0]
    n8, n11 = STREAM.count(8) * 2, STREAM.count(11) * 2
    assert layer["counts"]["text"] == [n8, n8, 0, n11, n11, 0, 0, 0]
    p_image = torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    p_text = torch.tensor([n8, n8, 0, n11, n11, 0, 0, 0], dtype=torch.float64) / (2 * n_text)
    assert layer["load"]["image"] == pytest.approx(p_image.tolist())
    s = layer["specialization"]
    assert s[2] == 1.0 and s[0] == s[1] == s[4] == -1.0 and s[5:] == [0.0, 0.0, 0.0]
    assert s[3] == pytest.approx(float((0.5 - p_text[3]) / (0.5 + p_text[3])))
    assert layer["specialized_experts"] == {"image": 1, "text": 3}
    assert layer["max_vio"]["image"] == pytest.approx(3.0)  # 2 of 8 experts take every image slot
    assert layer["js_divergence"] == pytest.approx(js_divergence(p_image, p_text))
    # the per-modality norms add up to the layer's
    overall = r.layers[0]
    for key, norms in (("shared_norm_mean", overall.shared_norm), ("routed_norm_mean", overall.routed_norm)):
        total = layer[key]["image"] * n_image + layer[key]["text"] * n_text
        assert total == pytest.approx(float(norms.double().sum()), rel=1e-6)


def test_shared_share_per_modality_is_zero_without_shared_output(routed):
    _, sources, _ = routed
    r = route(constructed_model(shared=False), sources, batch_size=2)
    (layer,) = modality_report(r.layers, r.token_ids, IMAGE, 8)["layers"]
    assert layer["shared_norm_share"] == {"image": 0.0, "text": 0.0}


def test_analyze_reports_modality_when_the_data_holds_image_tokens_or_when_asked(routed):
    model, sources, _ = routed
    assert "modality" not in analyze(model, FakeTokenizer(), sources, probe_tokens=0)  # no image id known
    asked = analyze(model, FakeTokenizer(), sources, probe_tokens=0, modality_token_id=IMAGE)
    assert asked["modality"]["token_id_from"] == "--modality-token-id"
    model.config.media_placeholder_token_id = IMAGE  # a vision-language model's placeholder id, from its config
    try:
        found = analyze(model, FakeTokenizer(), sources, probe_tokens=0)
    finally:
        model.config.media_placeholder_token_id = None
    assert found["modality"]["token_id_from"] == "config"
    assert found["modality"]["layers"] == asked["modality"]["layers"]


def test_modality_routed_model_uses_disjoint_experts_and_maxvio_counts_reachable_experts():
    config = ModelConfig.preset("tiny", media_placeholder_token_id=IMAGE, num_nextn_predict_layers=0,
                                modality_expert_groups={"image": [1], "text": [0, 2, 3]})
    torch.manual_seed(0)
    model = build_model(config).eval()
    ids = torch.randint(11, config.vocab_size, (4, 32))
    ids[:, ::3] = IMAGE
    r = route(model, [Source("mixed", ids)], batch_size=4)
    report = modality_report(r.layers, r.token_ids, IMAGE, 8, config.modality_expert_groups, config.n_group)
    (layer,) = report["layers"]
    assert layer["js_divergence"] == pytest.approx(1.0)
    assert layer["counts"]["image"][2] == layer["counts"]["image"][3] == report["tokens"]["image"]  # k = 2 of 2
    assert layer["max_vio"]["image"] == 0.0  # balanced over the 2 experts image tokens can reach
    used = [e for e in range(8) if layer["counts"]["image"][e] + layer["counts"]["text"][e] > 0]
    assert all(abs(layer["specialization"][e]) == 1.0 for e in used)


def test_analyze_command_writes_modality_from_a_token_id_jsonl(tmp_path, capsys):
    from test_inference_tokenizer import make_model_dir

    model_dir = make_model_dir(tmp_path / "model", media_placeholder_token_id=IMAGE,
                               modality_expert_groups={"image": [0, 1], "text": [2, 3]})
    data = tmp_path / "mixed.jsonl"
    rows = [[0] + [IMAGE] * 8 + list(range(20 + i, 40 + i)) + [1] for i in range(6)]
    data.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in rows))
    out = tmp_path / "report"
    assert main(["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len", "15",
                 "--probe-tokens", "0", "--no-progress"]) == 0
    assert "per modality: 48 image and" in capsys.readouterr().out
    results = json.loads((out / "analysis.json").read_text())
    m = results["modality"]
    assert m["image_token_id"] == IMAGE and m["expert_groups"] == {"image": [0, 1], "text": [2, 3]}
    assert m["layers"][0]["js_divergence"] == pytest.approx(1.0)
    page = (out / "report.html").read_text()
    assert "Routing per modality" in page and "image groups [0, 1]" in page
    assert main(["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--modality-token-id", "512"]) == 2
    assert "--modality-token-id 512: expected a token id below the model's vocab_size=512" in capsys.readouterr().err
    data.write_text(json.dumps({"input_ids": [1, 2, 600]}) + "\n")
    assert main(["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert "'input_ids' is a list of token ids in [0, vocab_size=512)" in capsys.readouterr().err
