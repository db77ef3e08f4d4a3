"""The families after V3 through every command (issue 21, item 6): DeepSeek-V3.2 (tiny-v32), DeepSeek-V4 (tiny-v4:
sliding, compressed-sparse and heavily-compressed layers, a hash-routed MoE layer) and multi-head attention
(`use_mla=false`, with DeepSeek-V2's router so that it saves as transformers' DeepSeek-OCR-2 text model).

Each family trains a few steps once (and is resumed), then its final folder goes through generate (eager and
compiled), serve, analyze, expand, torchrun with expert parallelism and transformers. The numerics of each family
against transformers are tested in test_v32.py, test_v4.py and test_mha.py; this file tests the glue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe.cli import main
from seekmoe.inference import Engine, SamplingParams
from seekmoe.inference import compiled

# CLI overrides of each family's training; the MHA model routes as DeepSeek-V2 (softmax, greedy, unnormalized
# top-k) and half-split RoPE: what transformers' DeepseekOcr2TextModel has, so its folder loads there.
FAMILIES = {
    "v32": ["--preset", "tiny-v32"],
    "v4": ["--preset", "tiny-v4"],
    "mha": ["--preset", "tiny", "use_mla=false", "scoring_func=softmax", "topk_method=greedy", "n_group=1",
            "topk_group=1", "norm_topk_prob=false", "rope_interleave=false"],
}
PROMPT = "def parse(text, *, strict=False):\n    for line in text.splitlines():\n        if line.strip():"
STEPS = 3


def train_args(family: str, corpus, cache, out: Path, *flags: str, fields: tuple[str, ...] = ()) -> list[str]:
    """`seekmoe train` of `family` for STEPS steps of 4 sequences of 32 tokens; `fields` override the defaults."""
    preset, overrides = FAMILIES[family][:2], FAMILIES[family][2:]
    return ["train", *preset, "--data", str(corpus), "--out", str(out), "--max-steps", str(STEPS), "--save-every",
            str(STEPS), "--eval-every", str(STEPS), "--no-progress", *flags, "seq_len=32", "batch_size=4",
            "precision=fp32", "eval_batches=1", "lr=3e-3", f"cache_dir={cache}", *overrides, *fields]


@pytest.fixture(scope="module")
def runs(corpus, cache, tmp_path_factory):
    """family -> its run folder: trained STEPS steps uninterrupted (`full`) and stopped at 2 then resumed (`cut`)."""
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            root = tmp_path_factory.mktemp(family)
            assert main(train_args(family, corpus, cache, root / "full")) == 0
            assert main(train_args(family, corpus, cache, root / "cut", "--stop-at", "2")) == 0
            assert main(train_args(family, corpus, cache, root / "cut", "--resume")) == 0
            done[family] = root
        return done[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_resumes_to_the_uninterrupted_runs_weights(runs, family):
    root = runs(family)
    full, cut = (seekmoe.from_pretrained(root / r / "final") for r in ("full", "cut"))
    assert full.config.model_type == {"v32": "deepseek_v32", "v4": "deepseek_v4", "mha": "deepseek_ocr2_text"}[family]
    for (name, p), q in zip(full.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(p, q), name
    metrics = [json.loads(line) for line in (root / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, STEPS + 1))


def generate(model_dir: Path, capsys, *extra: str) -> str:
    args = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature",
            "0", *extra]
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_eager_and_compiled_give_the_same_greedy_text(runs, family, capsys, monkeypatch):
    """A prompt longer than the indexer's top-k and V4's window and compression rates; the compiled decode step
    captured by aot_eager (the graphs inductor would compile, in a fraction of the time)."""
    final = runs(family) / "full" / "final"
    eager = generate(final, capsys, "--compile", "off")
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    assert generate(final, capsys, "--compile", "on") == eager
    assert eager.strip()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_serve_answers_a_completion_as_the_engine_decodes(runs, family):
    import http.client

    from seekmoe.serve import make_server

    final = runs(family) / "full" / "final"
    engine = Engine.from_pretrained(final, max_batch_size=2, compile=False)
    server = make_server(engine, family, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        body = {"model": family, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        got = json.loads(response.read().decode())
        assert response.status == 200, got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    reference = Engine.from_pretrained(final, max_batch_size=1, compile=False)
    (want,) = reference.generate([reference.tokenizer.encode(PROMPT)], SamplingParams(max_new_tokens=8,
                                                                                      temperature=0))
    assert got["choices"][0]["text"] == want.text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_folders_load_in_transformers_with_the_same_logits(runs, family):
    import transformers

    final = runs(family) / "full" / "final"
    ours = seekmoe.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(ids).logits
        if family == "mha":  # transformers has the text model only: its hidden states through our head
            from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

            theirs = DeepseekOcr2TextModel.from_pretrained(final, dtype=torch.float32).eval()
            got = ours.lm_head(theirs(ids).last_hidden_state)
        else:
            theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
            got = theirs(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-4


def test_analyze_reports_hash_routed_and_learned_v4_layers_side_by_side(runs, corpus, tmp_path):
    final = runs("v4") / "full" / "final"
    assert main(["analyze", "--model", str(final), "--data", str(corpus), "--out", str(tmp_path), "--max-tokens",
                 "256", "--probe-tokens", "64", "--seq-len", "32", "--no-progress"]) == 0
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert result["model"]["routing"] == ["hash", "learned", "learned"]  # tiny-v4: mlp_layer_types hash_moe, moe, moe
    assert [layer["routing"] for layer in result["layers"]] == ["hash", "learned", "learned"]
    probes = result["probes"]  # run on the learned layers, the hash layer keeping its table
    assert set(probes["skip_top"]) == {"1", "2"} and "hash-routed layer(s) [0]" in probes["note"]
    assert "<td>0 (hash)</td>" in (tmp_path / "report.html").read_text()


def test_expand_of_a_v4_model_loads_in_transformers_and_keeps_the_token_table(runs, tmp_path):
    import transformers

    final = runs("v4") / "full" / "final"
    assert main(["expand", "--model", str(final), "--add-experts", "2", "--out", str(tmp_path / "grown")]) == 0
    old, new = (seekmoe.from_pretrained(p, dtype=torch.float32).eval() for p in (final, tmp_path / "grown"))
    assert new.config.n_routed_experts == old.config.n_routed_experts + 2
    assert torch.equal(new.model.layers[0].mlp.gate.tid2eid, old.model.layers[0].mlp.gate.tid2eid)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grown", dtype=torch.float32).eval()
    ids = torch.randint(0, new.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = new(ids).logits
        assert ((theirs(ids).logits - want).abs().max() / want.abs().max()).item() < 2e-4


def test_torchrun_with_expert_parallelism_reproduces_one_v4_process(runs, corpus, cache, tmp_path):
    """tiny-v4 (its hash-routed layer included) under `torchrun --nproc-per-node 2 ... parallel.ep=2`, 2 sequences
    a rank, against the uninterrupted one-process run of 4 sequences a step."""
    one = runs("v4") / "full"
    args = train_args("v4", corpus, cache, tmp_path / "ep2", fields=("batch_size=2", "parallel.ep=2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "seekmoe",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    want, got = losses(one), losses(tmp_path / "ep2")
    assert len(got) == len(want) == STEPS
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"
    ours, ref = (seekmoe.from_pretrained(r / "final").state_dict() for r in (tmp_path / "ep2", one))
    for name, p in ref.items():
        assert torch.allclose(ours[name].float(), p.float(), rtol=1e-3, atol=1e-5), name
