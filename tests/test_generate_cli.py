"""`seekmoe generate` and `seekmoe chat` on a tiny model directory."""

from __future__ import annotations

import io
import json

import pytest

from seekmoe.cli import main
from seekmoe.inference import Engine, SamplingParams
from test_inference_tokenizer import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def expected_completion(model_dir, prompt: str, n: int) -> str:
    engine = Engine.from_pretrained(model_dir, max_batch_size=1)
    return engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(max_new_tokens=n, temperature=0))[0].text


@pytest.mark.parametrize("speculative", [[], ["--speculative", "mtp"]])
def test_generate_prints_only_the_completion(model_dir, capsys, speculative):
    args = ["generate", "--model", str(model_dir), "--prompt", "def f(", "--max-new-tokens", "12", *speculative]
    assert main(args + ["--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == expected_completion(model_dir, "def f(", 12) + "\n"
    assert "tokens/s" in err and ("acceptance" in err) == bool(speculative)


def test_generate_completes_every_line_of_a_prompts_file(model_dir, tmp_path, capsys):
    prompts = ["import os", "class A:", "x = 1"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == prompts
    assert [x["completion"] for x in lines] == [expected_completion(model_dir, p, 6) for p in prompts]


def test_generate_reports_bad_values_as_clean_errors(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p=2.0" in capsys.readouterr().err


def test_chat_answers_each_line_through_the_chat_template(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nHow are you?\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2


def test_ignore_eos_generates_exactly_max_new_tokens(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("x\n")
    args = ["generate", "--model", str(model_dir), "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens",
            "40", "--temperature", "1", "--seed", "3", "--ignore-eos", "--stats"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["finish_reason"] == "length" and err.startswith("40 tokens")


def test_speculative_flags_are_checked(model_dir, capsys):
    base = ["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2"]
    assert main(base + ["--num-speculative-tokens", "1"]) == 2
    assert "expected --speculative mtp" in capsys.readouterr().err
    assert main(base + ["--speculative", "mtp", "--num-speculative-tokens", "9"]) == 2
    assert "num_speculative_tokens=9" in capsys.readouterr().err
    assert main(base + ["--speculative", "mtp", "--num-speculative-tokens", "1"]) == 0
