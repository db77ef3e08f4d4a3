"""Quantized weights (int8/int4 weight-only, seekmoe/quant/) and the compiled bf16 decoding they run under."""

from __future__ import annotations

import pytest
import torch

from seekmoe.cli import main
from seekmoe.inference import compiled
from seekmoe.model.mlp import MLP
from test_inference_tokenizer import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


# ----------------------------------------------------------------------------------- compiled bf16 decoding
def test_compiled_bf16_decoding_generates_every_token(model_dir, capsys, monkeypatch):
    """Issue 24's bug: `generate --compile on --dtype bfloat16` stopped after one token (KeyError 'gate_proj')."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # dynamo's capture is where it failed; inductor is slow
    torch._dynamo.reset()
    args = ["generate", "--model", str(model_dir), "--prompt", "def f(", "--max-new-tokens", "12", "--ignore-eos",
            "--compile", "on", "--dtype", "bfloat16", "--stats"]
    assert main(args) == 0
    assert capsys.readouterr().err.startswith("12 tokens")


def test_a_graph_break_in_a_block_fails_the_request_and_generate_exits_nonzero(model_dir, capsys, monkeypatch):
    """The bug's mechanism: without module guards, a graph break made dynamo run one block's compiled frame for a
    block of another kind. Now a graph break is a compile error, the request ends in error, and the command says
    so with a non-zero exit instead of printing a short completion."""
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    forward = MLP.forward

    def breaking(self, x):
        torch._dynamo.graph_break()
        return forward(self, x)

    monkeypatch.setattr(MLP, "forward", breaking)
    torch._dynamo.reset()
    args = ["generate", "--model", str(model_dir), "--prompt", "def f(", "--max-new-tokens", "6", "--ignore-eos",
            "--compile", "on"]
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("seekmoe generate: error: 1 of 1 requests failed after 1 tokens: Unsupported: ")
    torch._dynamo.reset()
