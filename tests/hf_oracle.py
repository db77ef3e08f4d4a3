"""Tiny random DeepSeek-V2/V3 models built and saved by transformers itself: the oracle for our numerics."""

from __future__ import annotations

import torch

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def hf_config(model_type: str = "deepseek_v3", *, q_lora_rank: int | None = 24, yarn: bool = False, **overrides):
    """A transformers DeepseekV2Config/DeepseekV3Config small enough for CPU tests, every feature switchable."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=q_lora_rank,
                  kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                  max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6,
                  rope_parameters=dict(YARN) if yarn else {"rope_type": "default", "rope_theta": 10000.0},
                  tie_word_embeddings=False)
    if model_type == "deepseek_v3":
        common.update(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                      num_nextn_predict_layers=0)
        common.update(overrides)
        return DeepseekV3Config(**common)
    common.update(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                  norm_topk_prob=False)
    common.update(overrides)
    return DeepseekV2Config(**common)


def hf_model(config, seed: int = 0):
    """A transformers causal LM with random weights, including a nonzero V3 selection bias, in fp32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
