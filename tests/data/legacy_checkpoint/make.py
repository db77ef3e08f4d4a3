"""Writes a checkpoint in the single-process format of seekmoe before the DCP-only change (commit 89b99e2).

Run with that commit's sources: `PYTHONPATH=src python make.py TMP`; this folder holds TMP/cut's `checkpoints/` and
`metrics.jsonl` (a run stopped at step 2 of 4) and, in uninterrupted.json, the losses of TMP/full (the same run
without a stop). tests/test_checkpoints.py generates the same corpus and resumes the stored run with today's code.
"""
import json, sys
from pathlib import Path
from seekmoe.train import load_run_config, train
from seekmoe.train.metrics import read_metrics

def corpus_text() -> str:
    animals = ["cat", "dog", "owl", "fox", "eel", "bee", "yak"]
    verbs = ["sees", "likes", "finds", "moves", "keeps"]
    things = ["box", "tree", "stone", "cup", "hat", "rope", "map", "lamp", "coin", "key", "bell"]
    return "".join(f"the {animals[i % 7]} {verbs[(i * 3) % 5]} the {things[(i * 5) % 11]} number {i % 97}.\n"
                   for i in range(3000))

OVERRIDES = dict(vocab_size=280, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_attention_heads=2,
                 n_routed_experts=4, n_group=2, topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, seq_len=32, batch_size=2, warmup_steps=1, max_steps=4,
                 save_every=2, eval_every=2, eval_batches=1, precision="fp32", keep_checkpoints=1)
out = Path(sys.argv[1])
(out / "corpus").mkdir(parents=True, exist_ok=True)
text = corpus_text().splitlines(keepends=True)
for k in range(6):
    (out / "corpus" / f"part{k}.txt").write_text("".join(text[k * 500:(k + 1) * 500]))
m, c = load_run_config("tiny", overrides={**OVERRIDES, "cache_dir": str(out / "cache")})
train(m, c, out / "full", data=[str(out / "corpus")], progress=False)
train(m, c, out / "cut", data=[str(out / "corpus")], progress=False, stop_at=2)
print(json.dumps([r["loss"] for r in read_metrics(out / "full")]))
