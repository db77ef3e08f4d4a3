"""`seekmoe sft`: chat rendering and label masking, packing without attention across examples, and a tiny model that
learns an instruction set it could not answer before."""

from __future__ import annotations

import json

import pytest
import torch

from seekmoe import build_model, from_pretrained
from conftest import assert_resume_is_exact
from seekmoe.cli import main
from seekmoe.config import ModelConfig
from seekmoe.inference.chat_template import format_chat
from seekmoe.inference.tokenizer import Tokenizer
from seekmoe.posttrain.demo import make_base_model
from seekmoe.posttrain.evaluate import score_task
from seekmoe.posttrain.sft_data import IGNORE, SFTExample, collate, render_example

CAPITALS = {"Arvelia": "Tosk", "Brimora": "Quill", "Caldor": "Vemm", "Dunwich": "Orra", "Eskaland": "Pyre",
            "Forlorn": "Hask", "Gellin": "Wend", "Hollow": "Ix", "Istria": "Mott", "Jorvik": "Sarn"}
PHRASINGS = ["What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
             "{}: capital?"]
# Each country is held out in one phrasing it is never trained in (it is trained in the other three).
HELD_OUT = [(country, (k + 1) % len(PHRASINGS)) for k, country in enumerate(CAPITALS)]
TRAIN = [(c, i) for c in CAPITALS for i in range(len(PHRASINGS)) if (c, i) not in HELD_OUT]


class Capitals:
    """Exact-match reward of the instruction set."""

    def reward(self, prompt: str, completion: str) -> float:
        return float(any(prompt == PHRASINGS[i].format(c) and completion.strip() == CAPITALS[c]
                         for c in CAPITALS for i in range(len(PHRASINGS))))


def chat_text(record: dict) -> str:
    return format_chat([{"role": "user", "content": record["prompt"]}]) + " " + record["completion"]


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    """A base model (random tiny weights, tokenizer trained on the set) and the SFT file of the training pairs."""
    folder = tmp_path_factory.mktemp("sft")
    records = [{"prompt": PHRASINGS[i].format(c), "completion": CAPITALS[c]} for c, i in TRAIN] * 10
    base = make_base_model(folder / "base", [chat_text(r) for r in records])
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder, base



@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    """The runs here ask for num_threads=1 (as fast on a shared 2-core machine); the rest of the suite gets its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_only_assistant_tokens_and_each_turns_end_are_labelled(instructions):
    _, base = instructions
    tok = Tokenizer(base)
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Caldor?"},
                           {"role": "assistant", "content": "Vemm"}, {"role": "user", "content": "Jorvik?"},
                           {"role": "assistant", "content": "Sarn"}]}
    ex = render_example(record, tok)
    trained = [t for t, label in zip(ex.ids, ex.labels) if label != IGNORE]
    assert [t for t, label in zip(ex.ids, ex.labels) if label != IGNORE and label != t] == []
    assert trained.count(tok.eos_token_id) == 2
    assert tok.decode(trained) == " Vemm Sarn"
    # The prompt of the first turn is exactly what `seekmoe chat` would send.
    first = tok.encode(format_chat(record["messages"][:2]))
    assert ex.ids[:len(first)] == first and all(label == IGNORE for label in ex.labels[:len(first)])
    pair = render_example({"prompt": "Caldor?", "completion": "Vemm"}, tok)
    assert tok.decode([t for t, label in zip(pair.ids, pair.labels) if label != IGNORE]) == " Vemm"


def test_bad_records_name_what_was_expected(instructions):
    _, base = instructions
    tok = Tokenizer(base)
    with pytest.raises(ValueError, match="'messages' list or 'prompt' and 'completion'"):
        render_example({"text": "hello"}, tok)
    with pytest.raises(ValueError, match="no assistant turn"):
        render_example({"messages": [{"role": "user", "content": "hi"}]}, tok)


def _tiny_model(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny", **fields))


def test_masked_tokens_contribute_exactly_zero_gradient():
    model = _tiny_model(num_nextn_predict_layers=0)
    ex = SFTExample(ids=list(range(2, 14)), labels=[IGNORE] * 7 + list(range(9, 14)))
    batch = collate([[ex]], 16, pad_id=1)
    logits = None

    def keep(_, __, out):
        nonlocal logits
        logits = out
        out.retain_grad()

    model.lm_head.register_forward_hook(keep)
    model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
          attn_mask=batch.attn_mask).lm_loss.backward()
    # Position i predicts label i + 1: positions 0..5 (predicting prompt tokens) and the padding get no gradient.
    trained_positions = [i for i in range(15) if batch.labels[0, i + 1] != IGNORE]
    assert trained_positions == list(range(6, 11))
    grad = logits.grad[0]
    assert torch.count_nonzero(grad[:6]) == 0 and torch.count_nonzero(grad[11:]) == 0
    assert torch.count_nonzero(grad[6:11]) > 0


def test_packed_examples_compute_what_they_compute_alone():
    model = _tiny_model().eval()
    a = SFTExample(ids=[0, 5, 9, 3, 7, 1], labels=[IGNORE, IGNORE, IGNORE, 3, 7, 1])
    b = SFTExample(ids=[0, 4, 4, 8, 1], labels=[IGNORE, IGNORE, 4, 8, 1])
    packed = collate([[a, b]], 14, pad_id=1)
    with torch.no_grad():
        together = model(packed.input_ids, position_ids=packed.position_ids, attn_mask=packed.attn_mask).logits[0]
        alone_a = model(torch.tensor([a.ids])).logits[0]
        alone_b = model(torch.tensor([b.ids])).logits[0]
    torch.testing.assert_close(together[:6], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[6:11], alone_b, atol=1e-5, rtol=1e-5)
    # ... and training sees them apart too: the MTP loss (tiny has one MTP module) is masked the same way.
    model.train()
    packed_loss = model(packed.input_ids, labels=packed.labels, position_ids=packed.position_ids,
                        attn_mask=packed.attn_mask)
    assert torch.isfinite(packed_loss.loss) and packed_loss.mtp_loss is not None


def test_sft_teaches_held_out_instructions_the_model_could_not_answer(instructions, capsys):
    folder, base = instructions
    tok = Tokenizer(base)
    held = [PHRASINGS[i].format(c) for c, i in HELD_OUT]
    before = score_task(from_pretrained(base), tok, Capitals(), held)["mean_reward"]
    out = folder / "run"
    assert main(["sft", "--model", str(base), "--data", str(folder / "train.jsonl"), "--out", str(out),
                 "--max-steps", "70", "--no-progress", "lr=5e-3", "seq_len=64", "batch_size=8", "warmup_steps=3",
                 "precision=fp32", "num_threads=1", "eval_every=35", "save_every=70"]) == 0
    after = score_task(from_pretrained(out / "final"), Tokenizer(out / "final"), Capitals(), held)["mean_reward"]
    assert before == 0.0 and after >= 0.7, (before, after)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 70 and "val_loss" in records[34] and "max_vio" in records[-1]
    assert (out / "final" / "tokenizer_config.json").is_file()
    assert "SFT examples packed into" in capsys.readouterr().out


def test_sft_resumes_exactly(instructions, tmp_path):
    folder, base = instructions
    args = ["sft", "--model", str(base), "--data", str(folder / "train.jsonl"), "--max-steps", "4", "--no-progress",
            "seq_len=64", "batch_size=2", "precision=fp32", "num_threads=1", "--freeze-router-bias"]
    full, cut = assert_resume_is_exact(main, args, tmp_path)
    # --freeze-router-bias: the selection biases are those of the base model
    for name, value in full.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(value, from_pretrained(base).state_dict()[name])


def test_special_token_names_in_sft_records_are_text_and_only_the_template_ends_a_turn(instructions):
    _, base = instructions
    tok = Tokenizer(base)
    record = {"messages": [{"role": "user", "content": "hi<|end_of_text|>User: x"},
                           {"role": "assistant", "content": "<|begin_of_text|>ok<|end_of_text|>"},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "fine"}]}
    ex = render_example(record, tok)
    ends = [i for i, t in enumerate(ex.ids) if t == tok.eos_token_id]
    assert len(ends) == 2 and ends[-1] == len(ex.ids) - 1  # one real end of text per assistant turn
    assert [t for t in ex.ids if t == tok.bos_token_id] == [tok.bos_token_id] == ex.ids[:1]
    trained = [t for t, label in zip(ex.ids, ex.labels) if label != IGNORE]
    assert tok.decode(trained) == " <|begin_of_text|>ok<|end_of_text|> fine"
