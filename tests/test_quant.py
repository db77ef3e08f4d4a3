"""Quantized weights (int8/int4 weight-only, seekmoe/quant/) and the compiled bf16 decoding they run under."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.cli import main
from seekmoe.inference import Engine, SamplingParams, compiled
from seekmoe.model.dispatch import LocalDispatcher
from seekmoe.model.experts import RoutedExperts
from seekmoe.model.mlp import MLP
from seekmoe.quant import (QuantizedExperts, QuantizedLinear, QuantSpec, configure_quantized, dequantize, quantize,
                           quantize_model)
from seekmoe.quant.folder import SINGLE_NAME
from seekmoe.quant.formats import bytes_per_weight, unpack_int4
from seekmoe.quant.kernels import DECODE_ROWS, int8_dynamic_matmul, rows_to_int8
from test_inference_tokenizer import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


# ----------------------------------------------------------------------------------- compiled bf16 decoding
def test_compiled_bf16_decoding_generates_every_token(model_dir, capsys, monkeypatch):
    """Issue 24's bug: `generate --compile on --dtype bfloat16` stopped after one token (KeyError 'gate_proj')."""
    monkeypatch.setattr(compiled, "BACKEND", "eager")  # dynamo's capture is where it failed; inductor is slow
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
    if not compiled._HAS_ISOLATED_GUARD_SKIPPING:  # torch < 2.13 keeps the module guards: a break is only slower
        assert main(args + ["--stats"]) == 0 and capsys.readouterr().err.startswith("6 tokens")
        return
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("seekmoe generate: error: 1 of 1 requests failed after 1 tokens: Unsupported: ")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ helpers
def trained_tiny_model(steps: int = 40):
    """A tiny model trained to continue a few fixed token cycles: its greedy continuations have clear margins, as a
    real model's mostly do (a random model's top two logits are often closer than any rounding)."""
    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    cycles = [torch.randperm(500)[:11] + 2 for _ in range(4)]
    data = torch.stack([c.repeat(4)[:40] for c in cycles])  # [4, 40]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), [c.tolist()[:5] for c in cycles]


def greedy(model, prompts, n: int = 20, compile: bool = False):
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=64, compile=compile)
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    return [r.output_ids for r in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def trained():
    return trained_tiny_model()


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 16)], ids=["int8", "int4"])
def test_formats_round_trip_within_half_a_step(spec):
    w = torch.randn(3, 24, 64)
    q, s = quantize(w, spec)
    error = (dequantize(q, s, spec.scheme) - w).abs()
    step = s.float().abs()
    step = step.unsqueeze(-1) if spec.scheme == "int8" else step.repeat_interleave(spec.group_size, -1)
    # int4's codes stop at +7: the group's opposite extreme may be clamped by up to one step.
    assert (error <= step * (0.5 if spec.scheme == "int8" else 1.0) + 1e-7).all()
    assert q.shape[-1] == (64 if spec.scheme == "int8" else 32) and bytes_per_weight(spec) < 1.01


def test_casting_a_quantized_model_leaves_codes_and_scales_alone():
    model = quantize_model(seekmoe.build_model(ModelConfig.preset("tiny")), QuantSpec("int4"))
    scale = model.model.layers[1].mlp.experts.gate_up_proj.scale.clone()
    model.to(torch.bfloat16)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.qweight.dtype == torch.uint8 and torch.equal(experts.gate_up_proj.scale, scale)
    assert model.model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("fused", [False, True])
def test_quantized_experts_and_linears_equal_float64_on_their_dequantized_weights(scheme, fused):
    """Oracle: the float experts and linears in float64 with the dequantized weights, fresh random inputs, in
    decoding's few-rows case and prefill's many-rows case (eager int8's few rows round the activations too: the
    next test)."""
    integer = scheme == "int8" and not fused
    spec = QuantSpec(scheme, 16)
    experts = RoutedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    quantized = QuantizedExperts.from_float(experts, spec)
    quantized.fused = fused
    oracle = RoutedExperts(8, 32, 16).double()
    with torch.no_grad():
        oracle.gate_up_proj.copy_(dequantize(quantized.gate_up_proj.qweight, quantized.gate_up_proj.scale, scheme))
        oracle.down_proj.copy_(dequantize(quantized.down_proj.qweight, quantized.down_proj.scale, scheme))
    dispatcher = LocalDispatcher(8)
    for tokens in (24,) if integer else (2, 24):
        x = torch.randn(tokens, 32)
        scores = torch.rand(tokens, 8)
        weights, indices = scores.topk(2, dim=-1)
        rows, row_weights, plan = dispatcher.dispatch(x, indices, weights)
        got = quantized(rows, row_weights, plan)
        want = oracle(rows.double(), row_weights, plan)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    linear = torch.nn.Linear(32, 24, bias=False)
    qlinear = QuantizedLinear.from_float(linear, spec)
    qlinear.fused = fused
    x = torch.randn(4 if integer else 2, 3, 32)
    want = x.double() @ dequantize(qlinear.weight.qweight, qlinear.weight.scale, scheme).double().t()
    torch.testing.assert_close(qlinear(x).double(), want, rtol=1e-5, atol=1e-5)


def test_int8_integer_products_err_only_by_rounding_the_activations():
    """Eager int8 decoding multiplies int8 activations by the int8 codes (torch._int_mm). Oracles: the integer
    product in int64, and float64 on the dequantized weights, from which each output may move by at most
    sum_k |w_k| * x_scale / 2 (every input rounded to its row's step x_scale = max |x| / 127)."""
    torch.manual_seed(0)  # the expert check below rounds its float64 oracle's activations: no near-ties by chance
    w = torch.randn(24, 40)
    codes, scale = quantize(w, QuantSpec("int8"))
    x = torch.randn(DECODE_ROWS, 40)
    x[1] = 0  # an all-zero row: scale floor, codes 0, output 0
    x[2, 5] = 50.0  # an outlier coarsens its row's step
    x8, x_scale = rows_to_int8(x)
    assert torch.equal(torch._int_mm(x8, codes.t()).long(), x8.long() @ codes.long().t())
    got = int8_dynamic_matmul(x, codes, scale).double()
    w_deq = dequantize(codes, scale, "int8").double()
    want = x.double() @ w_deq.t()
    bound = x_scale.double() / 2 * w_deq.abs().sum(-1)  # [M, out]
    assert ((got - want).abs() <= bound + 1e-5).all() and torch.equal(got[1], torch.zeros(24, dtype=torch.float64))
    # Through the experts (eager, decoding's few rows): each row's own expert, both projections, against float64
    # on the dequantized weights with the activations rounded as the kernel rounds them.
    experts = RoutedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    quantized = QuantizedExperts.from_float(experts, QuantSpec("int8"))
    gu = dequantize(quantized.gate_up_proj.qweight, quantized.gate_up_proj.scale, "int8").double()
    dn = dequantize(quantized.down_proj.qweight, quantized.down_proj.scale, "int8").double()
    x, scores = torch.randn(2, 32), torch.rand(2, 8)
    weights, indices = scores.topk(2, dim=-1)
    rows, row_weights, plan = LocalDispatcher(8).dispatch(x, indices, weights)
    got = quantized(rows, row_weights, plan).double()

    def rounded(v):
        v8, v_scale = rows_to_int8(v)
        return v8.double() * v_scale.double()

    h = torch.einsum("moi,mi->mo", gu[plan.expert], rounded(rows))
    gate, up = h.chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) * up * row_weights.double().unsqueeze(-1)
    want = torch.einsum("moi,mi->mo", dn[plan.expert], rounded(a.float()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [4, 16, 32])  # 4: bytes unpacked one by one; 16, 32: 8 bytes a word
def test_int4_bytes_hold_column_j_and_column_j_plus_half_a_group(group_size):
    """llama.cpp's Q4_0 nibble order (formats.py): byte j of a group holds column j low and j + g/2 high; and
    dequantize gives (code - 8) * scale in every unpacking path."""
    G, half = 64 // group_size, group_size // 2
    w = torch.randn(5, 64)
    q, s = quantize(w, QuantSpec("int4", group_size))
    codes = torch.round(w.unflatten(-1, (G, -1)) / s.float().unsqueeze(-1)).add(8).clamp(0, 15).to(torch.uint8)
    assert torch.equal(q.unflatten(-1, (G, half)) & 15, codes[..., :half])
    assert torch.equal(q.unflatten(-1, (G, half)) >> 4, codes[..., half:])
    assert torch.equal(unpack_int4(q, G), codes.flatten(-2))
    want = ((codes.float() - 8) * s.float().unsqueeze(-1)).flatten(-2)
    assert torch.equal(dequantize(q, s, "int4"), want)
    odd = torch.empty(q.numel() + 1, dtype=torch.uint8)[1:].view(q.shape).copy_(q)  # not word-aligned: bytewise
    assert torch.equal(dequantize(odd, s, "int4"), want)
    assert torch.equal(dequantize(q, s, "int4", torch.bfloat16), want.bfloat16())


def test_int8_greedy_decoding_equals_fp32_on_a_trained_model(trained):
    """Eager decoding: int8 weights with int8-rounded activations (integer products) give fp32's tokens."""
    model, prompts = trained
    want = greedy(model, prompts)
    quantized = quantize_model(copy.deepcopy(model), QuantSpec("int8"))
    assert greedy(quantized, prompts) == want
    int4 = quantize_model(copy.deepcopy(model), QuantSpec("int4", 16), embeddings=True)
    agree = sum(a == b for x, y in zip(greedy(int4, prompts), want) for a, b in zip(x, y))
    assert agree >= 0.75 * sum(map(len, want))  # 4 bits: close, not bit-equal


def test_compiled_int8_decoding_equals_eager(trained, monkeypatch):
    """The fused multiply-and-sum products (compiled decoding's, float activations) give eager decoding's tokens
    (integer products on int8-rounded activations), with no graph break (fullgraph)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    model, prompts = trained
    quantized = quantize_model(copy.deepcopy(model), QuantSpec("int8"))
    want = greedy(quantized, prompts[:2], n=16)
    configure_quantized(quantized, compiled=True)
    assert greedy(quantized, prompts[:2], n=16, compile=True) == want
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ folders
@pytest.mark.parametrize("scheme,extra", [("int8", []), ("int4", ["--group-size", "16", "--embeddings"])])
def test_a_quantized_folder_reloads_with_the_same_logits(model_dir, tmp_path, capsys, scheme, extra):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--scheme", scheme, "--out", str(out), *extra]) == 0
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before  # the source is never written
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "seekmoe" and config["scheme"] == scheme
    assert (out / "tokenizer.json").is_file() and not list(out.glob("*.bin"))  # safetensors only, no pickle
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}  # safetensors' own is owner-only
    ids = torch.randint(0, 400, (2, 9))
    fresh = quantize_model(seekmoe.from_pretrained(model_dir), QuantSpec(scheme, 16),
                           embeddings="--embeddings" in extra)
    reloaded = seekmoe.from_pretrained(out)  # through the ordinary loader, which sees quantization_config
    assert isinstance(reloaded.model.layers[1].mlp.experts, QuantizedExperts)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, fresh(ids).logits)
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "def f(", "--max-new-tokens", "5", "--ignore-eos",
                 "--stats"]) == 0
    assert capsys.readouterr().err.startswith("5 tokens")


def test_an_int4_folder_in_the_older_interleaved_nibble_order_still_loads(model_dir, tmp_path, capsys):
    """Folders written before the "halves" order (even column low, odd high, no int4_order key) are repacked on load:
    the same logits as a folder written today."""
    from safetensors.torch import load_file, save_file

    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["quantize", "--model", str(model_dir), "--scheme", "int4", "--group-size", "16", "--out",
                 str(new)]) == 0
    capsys.readouterr()
    assert json.loads((new / "config.json").read_text())["quantization_config"]["int4_order"] == "halves"
    old.mkdir()
    state = load_file(str(new / SINGLE_NAME))
    for key in [k for k in state if k.endswith(".qweight")]:
        codes = unpack_int4(state[key], state[key.removesuffix("qweight") + "scale"].shape[-1])
        state[key] = codes[..., 0::2] | (codes[..., 1::2] << 4)  # the older order
    save_file(state, str(old / SINGLE_NAME))
    config = json.loads((new / "config.json").read_text())
    del config["quantization_config"]["int4_order"]
    (old / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        assert torch.equal(seekmoe.from_pretrained(old)(ids).logits, seekmoe.from_pretrained(new)(ids).logits)


def test_a_truncated_quantized_folder_is_refused_naming_the_tensor(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--scheme", "int8", "--out", str(out)]) == 0
    data = (out / SINGLE_NAME).read_bytes()
    (out / SINGLE_NAME).write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"tensor .* is cut short \(the file ends early\)"):
        seekmoe.from_pretrained(out)


def test_a_folder_larger_than_memory_is_quantized_from_its_mapped_files(model_dir, tmp_path, capsys, monkeypatch):
    """Only the quantized copy must fit: weights that do not are mapped from their files (the same bytes written as
    when they fit); a quantized copy that does not fit either is refused before anything is written."""
    from safetensors.torch import load_file

    import seekmoe.checkpoint as checkpoint
    import seekmoe.model_folder as model_folder

    fits, mapped = tmp_path / "fits", tmp_path / "mapped"
    argv = ["quantize", "--model", str(model_dir), "--scheme", "int4", "--group-size", "16", "--out"]
    assert main(argv + [str(fits)]) == 0
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: (1000, "a test"))
    with pytest.warns(checkpoint.MappedLoadNote, match="do not fit in memory"):
        assert main(argv + [str(mapped)]) == 0
    want, got = load_file(str(fits / SINGLE_NAME)), load_file(str(mapped / SINGLE_NAME))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    capsys.readouterr()
    monkeypatch.setattr(model_folder, "available_memory", lambda device: (1000, "a test"))
    assert main(argv + [str(tmp_path / "none")]) == 2
    assert "int4 weights" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_bad_quantization_options_fail_cleanly_before_writing(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    base = ["quantize", "--model", str(model_dir), "--out", str(out)]
    assert main(base + ["--scheme", "int4", "--group-size", "128"]) == 2  # the tiny model's widths are 32 and 64
    err = capsys.readouterr().err
    assert "multiple of group_size=128" in err and "Traceback" not in err and not out.exists()
    assert main(base + ["--scheme", "int4", "--group-size", "7"]) == 2
    assert "--group-size=7" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", "--model", str(model_dir), "--out", str(model_dir), "--scheme", "int8"]) == 2
    assert "is the --model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--scheme", "int3"])
    gen = ["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2"]
    assert main(gen + ["--quantize-embeddings"]) == 2
    assert "needs a scheme" in capsys.readouterr().err
    assert main(gen + ["--quantize", "int4", "--group-size", "48"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir), "--out", str(out), "--scheme", "int8"]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "x", "--quantize", "int8"]) == 2
    assert "quantized already" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ fp8 training
def test_fp8_training_on_a_cpu_is_one_clear_error_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--max-steps", "1", "precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert "precision=fp8 needs a CUDA GPU" in err and "Traceback" not in err and not out.exists()
