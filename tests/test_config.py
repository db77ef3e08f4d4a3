"""ModelConfig: presets, DeepSeek config.json in both transformers spellings, and clear errors."""

import json

import pytest

from seekmoe import PRESETS, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_config_json(name, tmp_path):
    config = ModelConfig.preset(name)
    config.save(tmp_path)
    assert ModelConfig.from_json_file(tmp_path) == config


@pytest.mark.parametrize("field,value,needle", [
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("n_group", 3, "n_group"),
    ("topk_group", 5, "topk_group"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("scoring_func", "relu", "scoring_func"),
    ("topk_method", "best", "topk_method"),
    ("hidden_size", 0, "hidden_size"),
    ("first_k_dense_replace", 5, "first_k_dense_replace"),
    ("q_lora_rank", -1, "q_lora_rank"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling"),
])
def test_impossible_config_raises_value_error_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle) as info:
        ModelConfig.preset("tiny", **{field: value})
    assert "expected" in str(info.value)


def test_too_few_experts_in_chosen_groups_is_rejected():
    # 8 experts in 4 groups, 1 group kept -> only 2 candidates for top-3.
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.preset("tiny", num_experts_per_tok=3, topk_group=1)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="deepseek-v3"):
        ModelConfig.preset("gpt-5")


DEEPSEEK_V3_CONFIG_4X = {  # the shape of DeepSeek-V3's released config.json (transformers 4.x spelling)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_reads_deepseek_v3_release_config_as_the_v3_preset():
    config = ModelConfig.from_dict(DEEPSEEK_V3_CONFIG_4X)
    preset = ModelConfig.preset("deepseek-v3")
    for f in ("hidden_size", "n_routed_experts", "topk_method", "scoring_func", "rope_scaling", "q_lora_rank",
              "num_nextn_predict_layers", "rope_theta"):
        assert getattr(config, f) == getattr(preset, f), f
    assert config.extra["quantization_config"]["weight_block_size"] == [128, 128]


def test_reads_transformers_5_rope_parameters():
    d = dict(DEEPSEEK_V3_CONFIG_4X)
    scaling = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0,
                            **{k: v for k, v in scaling.items() if k != "type"}}
    config = ModelConfig.from_dict(d)
    assert config.rope_theta == 50000.0 and config.rope_scaling["factor"] == 40


def test_reads_deepseek_v2_lite_config_with_null_groups():
    d = ModelConfig.preset("deepseek-v2-lite").to_dict()
    d.update(n_group=None, topk_group=None)
    del d["rope_parameters"]
    d["rope_theta"] = 10000
    d["rope_scaling"] = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    config = ModelConfig.from_dict(json.loads(json.dumps(d)))
    assert config.n_group == 1 and config.scoring_func == "softmax" and config.topk_method == "greedy"


def test_transformers_reads_our_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("tiny", "deepseek-v2-lite"):
        ModelConfig.preset(name).save(tmp_path)
        hf = transformers.AutoConfig.from_pretrained(tmp_path)
        ours = ModelConfig.preset(name)
        assert hf.model_type == ours.model_type
        assert hf.n_routed_experts == ours.n_routed_experts
        assert hf.num_key_value_heads == ours.num_attention_heads
        assert hf.rope_parameters["rope_theta"] == ours.rope_theta
