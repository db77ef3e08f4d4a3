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
# DeepSeekMoE 16B's expert layout (64 routed, 6 active, 2 shared) and depth, 4K context. seekmoe implements MLA
# only, so its attention is MLA with DeepSeek-V2-Lite's ranks instead of the original's 16-head MHA.
PRESETS["deepseek-moe-16b"] = {**PRESETS["deepseek-v2-lite"], "num_hidden_layers": 28,
                               "max_position_embeddings": 4096, "rope_scaling": None}
# DeepSeek-V3.2(-Exp): DeepSeek-V3 plus DeepSeek Sparse Attention, a lightning indexer of 64 heads of 128 picking
# 2048 past tokens per query in every layer (the MTP layer's included).
PRESETS["deepseek-v3.2"] = {**PRESETS["deepseek-v3"], "index_topk": 2048, "index_n_heads": 64,
                            "index_head_dim": 128}
# For tests and a CPU demo of sparse attention: `tiny` with an indexer whose top-k (8) is shorter than the
# training sequences, so attention is sparse in every step.
PRESETS["tiny-v32"] = {**PRESETS["tiny"], "index_topk": 8, "index_n_heads": 2, "index_head_dim": 16}
