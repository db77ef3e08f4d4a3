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
