"""Compiled decoding (torch.compile of the decode, verify and draft forwards): the same greedy tokens as eager, in
one graph per shape class, with no graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from seekmoe.inference import compiled
from seekmoe.inference.compiled import should_compile

PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 3, 3, 3, 3, 3, 3]]
# Every request runs to the same length, so the batch stays whole (each batch-size class is its own graph).
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return seekmoe.build_model(ModelConfig.preset("tiny")).eval()  # 1 MTP module (test_speculative has more)


def outputs(engine, prompts):
    return [r.output_ids for r in engine.generate(prompts, GREEDY)]


@pytest.fixture
def no_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    yield
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_mtp_decoding_gives_eager_greedy_tokens(model, no_graph_breaks, monkeypatch):
    """Graph capture of the verify and draft forwards (aot_eager: the graphs inductor would compile, captured
    fast); the plain decode step is compiled by inductor below."""
    speculative = "mtp"
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    want = outputs(Engine(model, max_batch_size=3, speculative=speculative, compile=False), PROMPTS)
    engine = Engine(model, max_batch_size=3, speculative=speculative, compile=True)
    assert outputs(engine, PROMPTS) == want
    assert engine.forwards.compile_seconds > 0


def test_static_shapes_for_cuda_graphs_give_the_same_tokens(model, monkeypatch):
    """The CUDA path's padded batch and full-length cache reads, run on the CPU with inductor's default mode."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    want = outputs(Engine(model, max_batch_size=4, speculative="mtp", compile=False), PROMPTS)
    engine = Engine(model, max_batch_size=4, speculative="mtp", compile=True)
    engine.forwards.static = True
    assert engine.forwards.batch(3) == 4
    assert outputs(engine, PROMPTS) == want


def test_inductor_compiled_decode_step_gives_eager_greedy_tokens(model, no_graph_breaks):
    """The real compiler, on the plain decode step at batch 1 (the benchmarked case)."""
    want = outputs(Engine(model, max_batch_size=1, compile=False), PROMPTS[:1])
    assert outputs(Engine(model, max_batch_size=1, compile=True), PROMPTS[:1]) == want


def test_compile_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert should_compile("auto", cuda) and not should_compile("auto", cpu) and should_compile("auto", cpu, True)
    assert should_compile("on", cpu) and not should_compile("off", cuda)
    with pytest.raises(ValueError, match="compile='yes'"):
        should_compile("yes", cpu)


def test_warm_up_compiles_the_graphs_that_greedy_and_sampled_requests_use(model, monkeypatch):
    """A server warms up before it listens: afterwards neither a greedy nor a sampled MTP request compiles."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    engine = Engine(model, max_batch_size=1, speculative="mtp", compile=True)  # one batch class: half the graphs
    assert engine.warm_up() > 0
    compiled_at_start = engine.forwards.compile_seconds
    assert compiled_at_start > 0
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=0.8, seed=1))
    engine.generate(PROMPTS[1:], GREEDY)
    assert engine.forwards.compile_seconds == compiled_at_start
