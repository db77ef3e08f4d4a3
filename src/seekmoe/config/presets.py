"""Named model shapes: `ModelConfig.preset(name)` (tests, the demo, the published DeepSeek models)."""

from __future__ import annotations

from typing import Any

_YARN_40X = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: every feature on (q-LoRA, groups, shared experts, a dense layer, MTP), well under 1M parameters.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 max_position_embeddings=512, num_nextn_predict_layers=1, initializer_range=0.02),
    # Learns Python-flavoured text on 2 CPU cores in minutes (`make demo`); sized for a CPU without native bf16.
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=None,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
                  max_position_embeddings=1024, num_nextn_predict_layers=1, initializer_range=0.02,
                  bias_update_speed=0.01),  # gamma: a few hundred steps, not V3's ~1M, to balance in
    "deepseek-v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                             topk_method="greedy", scoring_func="softmax", routed_scaling_factor=1.0,
                             norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                             qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                             rope_scaling={**_YARN_40X, "mscale": 0.707, "mscale_all_dim": 0.707},
                             num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001,
                             aux_loss_alpha=0.001),
    "deepseek-v2": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128,
                        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
                        topk_method="group_limited_greedy", scoring_func="softmax", routed_scaling_factor=16.0,
                        norm_topk_prob=False, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                        rope_scaling={**_YARN_40X, "mscale": 0.707, "mscale_all_dim": 0.707},
                        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.003),
    "deepseek-v3": dict(max_position_embeddings=163840,
                        rope_scaling={**_YARN_40X, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
# Dense counterparts (every layer a SwiGLU FFN) for `seekmoe upcycle` (grow/upcycle.py).
PRESETS["tiny-dense"] = {**PRESETS["tiny"], "n_routed_experts": 0, "first_k_dense_replace": 2}
PRESETS["small-dense"] = {**PRESETS["small"], "n_routed_experts": 0, "first_k_dense_replace": 3}

# ----- issue 21: DeepSeekMoE 16B's real attention, and the families read as DeepSeek-V3 -----
# DeepSeekMoE 16B (deepseek-ai/deepseek-moe-16b-base): 16 heads of ordinary multi-head attention, head_dim 128,
# Llama's half-split RoPE; 64 routed experts (6 active) + 2 shared, softmax routing; 16.4B total / 2.8B active.
PRESETS["deepseek-moe-16b"] = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                   moe_intermediate_size=1408, num_hidden_layers=28, first_k_dense_replace=1,
                                   num_attention_heads=16, use_mla=False, rope_interleave=False,
                                   n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
                                   topk_group=1, topk_method="greedy", scoring_func="softmax",
                                   routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=4096,
                                   rope_scaling=None, num_nextn_predict_layers=0, bos_token_id=100000,
                                   eos_token_id=100001, aux_loss_alpha=0.001, initializer_range=0.02)
# GLM-4.7-Flash (zai-org/GLM-4.7-Flash; transformers' Glm4MoeLiteConfig): MLA with V3's sigmoid/bias router.
PRESETS["glm-4.7-flash"] = dict(family="glm4_moe_lite", vocab_size=154880, hidden_size=2048, intermediate_size=10240,
                                moe_intermediate_size=1536, num_hidden_layers=47, first_k_dense_replace=1,
                                num_attention_heads=20, n_routed_experts=64, n_shared_experts=1,
                                num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=1.8,
                                q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
                                v_head_dim=256, rope_theta=1000000.0, max_position_embeddings=202752,
                                num_nextn_predict_layers=1, rms_norm_eps=1e-5, initializer_range=0.02)
# Kimi-K2 (moonshotai/Kimi-K2-Base, model_type kimi_k2, DeepSeek-V3's layout): 384 experts, 64 heads; 1T / 32B.
PRESETS["kimi-k2"] = dict(family="kimi_k2", vocab_size=163840, num_attention_heads=64, first_k_dense_replace=1,
                          n_routed_experts=384, n_group=1, topk_group=1, routed_scaling_factor=2.827,
                          rope_theta=50000.0, max_position_embeddings=131072,
                          rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                        "beta_fast": 1, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                          num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585)
# Moonlight-16B-A3B (moonshotai/Moonlight-16B-A3B, DeepSeek-V3's layout, trained with Muon): 15.29B / 2.24B.
PRESETS["moonlight-16b-a3b"] = dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                                    moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                                    num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
                                    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446,
                                    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                    v_head_dim=128, rope_theta=50000.0, max_position_embeddings=8192,
                                    num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585)
# DeepSeek-V3.2(-Exp): DeepSeek-V3 plus DeepSeek Sparse Attention, a lightning indexer of 64 heads of 128 picking
# 2048 past tokens per query in every layer (the MTP layer's included).
PRESETS["deepseek-v3.2"] = {**PRESETS["deepseek-v3"], "index_topk": 2048, "index_n_heads": 64,
                            "index_head_dim": 128}
# For tests and a CPU demo of sparse attention: `tiny` with an indexer whose top-k (8) is shorter than the
# training sequences, so attention is sparse in every step.
PRESETS["tiny-v32"] = {**PRESETS["tiny"], "index_topk": 8, "index_n_heads": 8, "index_head_dim": 16}
# DeepSeek-V4 (model_type deepseek_v4). Flash: transformers' default DeepseekV4Config (284.3B without MTP, 13B
# active), the compressed branches' YaRN as the release's config.json gives it. Pro: the release's config.json.
_V4_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}


def _v4_layer_types(n: int) -> list[str]:
    """transformers' default schedule: two heavily compressed layers, then compressed sparse and heavily compressed
    alternating."""
    return (["heavily_compressed_attention"] * min(n, 2)
            + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(n - 2)])


_V4_COMMON = dict(vocab_size=129280, head_dim=512, qk_rope_head_dim=64, num_experts_per_tok=6, n_shared_experts=1,
                  scoring_func="sqrtsoftplus", topk_method="noaux_tc", n_group=1, topk_group=1,
                  first_k_dense_replace=0, norm_topk_prob=True, max_position_embeddings=1048576, rope_theta=10000.0,
                  compress_rope_theta=160000.0, rope_scaling=_V4_YARN, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
                  swiglu_limit=10.0, sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512,
                  num_nextn_predict_layers=1, initializer_range=0.02,
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
PRESETS["deepseek-v4-flash"] = dict(
    _V4_COMMON, hidden_size=4096, intermediate_size=2048, moe_intermediate_size=2048, num_hidden_layers=43,
    num_attention_heads=64, q_lora_rank=1024, n_routed_experts=256, routed_scaling_factor=1.5, o_groups=8,
    o_lora_rank=1024, layer_types=_v4_layer_types(43), mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40)
PRESETS["deepseek-v4-pro"] = dict(
    _V4_COMMON, hidden_size=7168, intermediate_size=3072, moe_intermediate_size=3072, num_hidden_layers=61,
    num_attention_heads=128, q_lora_rank=1536, n_routed_experts=384, routed_scaling_factor=2.5, o_groups=16,
    o_lora_rank=1024, layer_types=_v4_layer_types(61), mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58)
# For tests and a first run: every V4 layer kind (sliding, CSA, HCA), a hash layer, short windows and rates so a
# 64-token sequence compresses, well under 1M parameters.
PRESETS["tiny-v4"] = dict(
    _V4_COMMON, vocab_size=512, hidden_size=64, intermediate_size=32, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, n_routed_experts=8,
    num_experts_per_tok=2, routed_scaling_factor=1.5, o_groups=2, o_lora_rank=16, sliding_window=16,
    index_n_heads=2, index_head_dim=16, index_topk=4, hc_mult=2, hc_sinkhorn_iters=8, max_position_embeddings=512,
    rope_scaling=None, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"])
