"""Logits equal transformers' DeepseekV2/V3ForCausalLM on tiny random checkpoints that transformers saved."""

import json

import pytest
import torch

import seekmoe
from hf_oracle import hf_config, hf_model, rel_error

pytest.importorskip("transformers")
TOL = 1e-4

VARIANTS = {
    "v3_sigmoid_bias_groups": dict(model_type="deepseek_v3"),
    "v3_no_q_lora": dict(model_type="deepseek_v3", q_lora_rank=None),
    "v3_yarn": dict(model_type="deepseek_v3", yarn=True),
    "v3_no_groups_two_shared": dict(model_type="deepseek_v3", n_group=1, topk_group=1, n_shared_experts=2),
    "v2_softmax_group_limited": dict(model_type="deepseek_v2"),
    "v2_greedy_yarn_no_q_lora": dict(model_type="deepseek_v2", topk_method="greedy", yarn=True, q_lora_rank=None),
}


def _inputs(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 24), generator=g)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    kwargs = dict(VARIANTS[variant])
    ref_model = hf_model(hf_config(**kwargs))
    ref_model.save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    ids = _inputs(ref_model.config.vocab_size)
    with torch.no_grad():
        ref = ref_model(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    err = rel_error(got, ref)
    print(f"largest relative logit error [{variant}]: {err:.2e}")
    assert err < TOL


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    ref_model = hf_model(hf_config("deepseek_v3"))
    ref_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    ids = _inputs(ref_model.config.vocab_size)
    with torch.no_grad():
        err = rel_error(ours(ids).logits, ref_model(ids).logits)
    print(f"largest relative logit error [sharded]: {err:.2e}")
    assert err < TOL


def test_fp8_block_quantized_checkpoint_dequantizes_on_load(tmp_path):
    """DeepSeek-V3's release format: float8_e4m3fn matrices with a per-block weight_scale_inv."""
    from safetensors.torch import load_file, save_file

    from seekmoe.checkpoint import dequantize_fp8, quantize_fp8

    block = (16, 16)  # smaller than the matrices, so tiling and ragged edges are exercised
    ref_model = hf_model(hf_config("deepseek_v3"))
    ref_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    quantized, dequantized = {}, {}
    for key, w in state.items():
        is_matrix = key.endswith("proj.weight") and w.dim() == 2
        if is_matrix:
            q, s = quantize_fp8(w, block)
            quantized[key], quantized[key + "_scale_inv"] = q, s
            dequantized[key] = dequantize_fp8(q, s, block)
        else:
            quantized[key] = dequantized[key] = w
    save_file(quantized, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    ref_model.load_state_dict(_hf_fused(dequantized, ref_model), strict=True)
    ids = _inputs(ref_model.config.vocab_size)
    with torch.no_grad():
        err = rel_error(ours(ids).logits, ref_model(ids).logits)
    print(f"largest relative logit error [fp8]: {err:.2e}")
    assert err < TOL


def _hf_fused(per_expert: dict, hf) -> dict:
    """transformers 5 keeps experts fused in memory: rebuild its in-memory state dict from per-expert keys."""
    target = hf.state_dict()
    out = {}
    for key in target:
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            E = target[key].shape[0]
            out[key] = torch.stack([torch.cat([per_expert[f"{prefix}{e}.gate_proj.weight"],
                                               per_expert[f"{prefix}{e}.up_proj.weight"]]) for e in range(E)])
        elif key.endswith("experts.down_proj"):
            prefix = key[: -len("down_proj")]
            out[key] = torch.stack([per_expert[f"{prefix}{e}.down_proj.weight"] for e in range(target[key].shape[0])])
        else:
            out[key] = per_expert[key]
    return out


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_saved_checkpoint_loads_in_transformers_with_same_logits(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    config = seekmoe.ModelConfig.from_dict(hf_config(model_type, yarn=True).to_dict())
    torch.manual_seed(0)
    ours = seekmoe.build_model(config.replace(initializer_range=0.1)).eval()
    with torch.no_grad():
        for router in (m.gate for m in ours.moe_layers()):
            if router.e_score_correction_bias is not None:
                router.e_score_correction_bias.normal_(0, 0.05)
    ours.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM")
    ids = _inputs(config.vocab_size)
    with torch.no_grad():
        err = rel_error(ours(ids).logits, theirs(ids).logits)
    print(f"largest relative logit error [save->transformers {model_type}]: {err:.2e}")
    assert err < TOL
