"""`seekmoe export --format gguf`: the file read back with gguf's own reader, and (where llama-cpp-python is
installed) run by llama.cpp, whose greedy tokens and logits must equal seekmoe's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seekmoe.cli import main
from test_inference_tokenizer import make_model_dir

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'seekmoe[gguf]')")


def _tensors(path) -> dict[str, np.ndarray]:
    """name -> the tensor in torch's order (GGUF stores the reversed shape), dequantized to fp32."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model without query compression (q_lora_rank null), the case llama.cpp's converter gets wrong."""
    return make_model_dir(tmp_path_factory.mktemp("gguf") / "model", seed=3, q_lora_rank=None)


def test_export_writes_every_deepseek2_key_and_the_expert_stacks(folder, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(folder), "--out", str(out), "--outtype", "f32"]) == 0
    assert "left out: the 1 MTP module" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert _field(reader, "general.architecture") == "deepseek2"
    assert _field(reader, "deepseek2.attention.q_lora_rank") == 0  # written although q_lora_rank is null
    assert _field(reader, "deepseek2.expert_count") == 8
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 0
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 512
    got = _tensors(out)
    disk = {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    assert "blk.2.attn_norm.weight" not in got  # the MTP layer
    assert "blk.0.attn_q.weight" in got and "blk.0.attn_q_a.weight" not in got
    np.testing.assert_array_equal(got["token_embd.weight"], disk["model.embed_tokens.weight"])
    for part in ("gate", "up", "down"):
        stacked = np.stack([disk[f"model.layers.1.mlp.experts.{e}.{part}_proj.weight"] for e in range(8)])
        np.testing.assert_array_equal(got[f"blk.1.ffn_{part}_exps.weight"], stacked)
    np.testing.assert_array_equal(got["blk.1.exp_probs_b.bias"], disk["model.layers.1.mlp.gate.e_score_correction_bias"])
    kv_b = disk["model.layers.0.self_attn.kv_b_proj.weight"].reshape(4, 16 + 16, 32)  # [heads, nope + v, kv_lora]
    np.testing.assert_array_equal(got["blk.0.attn_k_b.weight"], kv_b[:, :16].transpose(0, 2, 1))
    np.testing.assert_array_equal(got["blk.0.attn_v_b.weight"], kv_b[:, 16:])


@pytest.mark.parametrize("outtype,tolerance", [("bf16", 2**-8), ("f16", 2**-11), ("q8_0", 2**-6)])
def test_low_precision_types_round_the_weights_and_keep_norms_in_f32(folder, tmp_path, outtype, tolerance):
    out = tmp_path / f"m-{outtype}.gguf"
    assert main(["export", "--format", "gguf", "--model", str(folder), "--out", str(out), "--outtype", outtype]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_norm.weight"] == types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert types["blk.1.ffn_up_exps.weight"] == outtype.upper()
    got = _tensors(out)
    want = load_file(str(folder / "model.safetensors"))["model.layers.1.mlp.experts.5.up_proj.weight"].numpy()
    scale = np.abs(want).max()
    assert np.abs(got["blk.1.ffn_up_exps.weight"][5] - want).max() <= tolerance * scale


def test_literature_router_and_foreign_tokenizer_are_refused_before_writing(tmp_path, capsys):
    switch = make_model_dir(tmp_path / "switch", router_type="switch", num_experts_per_tok=1)
    out = tmp_path / "x.gguf"
    assert main(["export", "--format", "gguf", "--model", str(switch), "--out", str(out)]) == 2
    assert "router_type 'switch'" in capsys.readouterr().err and not out.exists()
    other = make_model_dir(tmp_path / "other")
    tok = (other / "tokenizer.json").read_text().replace('"add_prefix_space": false', '"add_prefix_space": true')
    (other / "tokenizer.json").write_text(tok)
    assert main(["export", "--format", "gguf", "--model", str(other), "--out", str(out)]) == 2
    assert "expected seekmoe's byte-level BPE" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--format", "gguf", "--model", str(other), "--out", str(out), "--outtype", "q4"]) == 2
    assert "--outtype 'q4'" in capsys.readouterr().err


_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
         "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.mark.parametrize("overrides", [
    dict(q_lora_rank=None),  # V3 routing (sigmoid, bias, groups), no query compression
    dict(),  # with query compression
    dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
         norm_topk_prob=False, routed_scaling_factor=1.0, rope_scaling=_YARN),  # V2-Lite's routing and YaRN
], ids=["v3-no-q-lora", "v3-q-lora", "v2-lite-yarn"])
def test_llama_cpp_decodes_the_exported_model_as_seekmoe_does(tmp_path, overrides):
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama-cpp-python is not installed ({e}): pip install llama-cpp-python to run the GGUF file")
    from seekmoe.inference import Engine
    from seekmoe.inference.sampling import SamplingParams

    # Larger weights than the default init: peaked next-token distributions, so fp32 rounding differences between
    # the two engines cannot flip a near-tie.
    folder = make_model_dir(tmp_path / "model", seed=5, initializer_range=0.15, **overrides)
    for outtype in ("f32", "bf16"):
        out = tmp_path / f"m-{outtype}.gguf"
        assert main(["export", "--format", "gguf", "--model", str(folder), "--out", str(out), "--outtype", outtype]) == 0
    engine = Engine.from_pretrained(folder, dtype=torch.float32, max_batch_size=1, max_seq_len=64)
    prompt = engine.tokenizer.encode("def add(a, b):\n    return")
    want = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0].output_ids
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1].numpy()

    f32 = 0  # GGML_TYPE_F32: an F16 cache would round what seekmoe keeps in fp32
    llm = llama_cpp.Llama(str(tmp_path / "m-f32.gguf"), n_ctx=64, n_threads=1, n_batch=64, logits_all=True,
                          verbose=False, type_k=f32, type_v=f32)
    assert llm.tokenize("def add(a, b):\n    return".encode(), add_bos=True, special=False) == prompt
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == list(want)
    # The logits of the prompt's last position against seekmoe's forward, fp32 both (~3e-6 apart when written).
    np.testing.assert_allclose(np.asarray(llm.scores[len(prompt) - 1]), logits, rtol=0, atol=1e-4)
    # The bf16 file: the same model, its weights rounded (~0.05 apart at logits of magnitude ~4).
    llm = llama_cpp.Llama(str(tmp_path / "m-bf16.gguf"), n_ctx=64, n_threads=1, n_batch=64, logits_all=True,
                          verbose=False, type_k=f32, type_v=f32)
    llm.eval(prompt)
    assert np.abs(np.asarray(llm.scores[len(prompt) - 1]) - logits).max() < 0.03 * np.abs(logits).max()
