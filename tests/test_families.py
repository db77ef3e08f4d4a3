"""Families with DeepSeek-V3's numerics under their own model_type: GLM-4.7-Flash (`glm4_moe_lite`) against
transformers, Kimi-K2/Moonlight folders (`kimi_k2`) read as V3 and written back as they were; the published models'
presets counted by `seekmoe info`."""

import json

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.info import model_summary
from hf_oracle import YARN, hf_config, hf_model, rel_error

pytest.importorskip("transformers")
TOL = 2e-4


def glm_config(**overrides):
    from transformers import Glm4MoeLiteConfig

    kwargs = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=24, kv_lora_rank=16,
                  qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, max_position_embeddings=128,
                  initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return Glm4MoeLiteConfig(**kwargs)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "mlp_layer_types": ["dense", "dense", "sparse"],
                                             "rope_parameters": dict(YARN)}],
                         ids=["default", "no_q_lora_two_dense_yarn"])
def test_glm4_moe_lite_folder_loads_with_transformers_logits_and_saves_back(overrides, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = hf_model(glm_config(**overrides))
    assert type(ref).__name__ == "Glm4MoeLiteForCausalLM"
    ref.save_pretrained(tmp_path / "theirs")
    ours = seekmoe.from_pretrained(tmp_path / "theirs", dtype=torch.float32)
    assert ours.config.model_type == "glm4_moe_lite"
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids).logits
        err = rel_error(ours(ids).logits, want)
    print(f"largest relative logit error [glm4_moe_lite]: {err:.2e}")
    assert err < TOL
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "glm4_moe_lite" and saved["architectures"] == ["Glm4MoeLiteForCausalLM"]
    assert saved["mlp_layer_types"] == ref.config.mlp_layer_types
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_error(again(ids).logits, want) < TOL


def test_kimi_k2_folder_reads_as_v3_and_saves_keeping_its_model_type(tmp_path):
    from safetensors import safe_open

    ref = hf_model(hf_config("deepseek_v3"))
    ref.save_pretrained(tmp_path / "kimi")
    config = json.loads((tmp_path / "kimi" / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    config.update(model_type="kimi_k2", auto_map=auto_map)  # as Kimi-K2 and Moonlight ship (remote code)
    (tmp_path / "kimi" / "config.json").write_text(json.dumps(config))
    ours = seekmoe.from_pretrained(tmp_path / "kimi", dtype=torch.float32)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        assert rel_error(ours(ids).logits, ref(ids).logits) < TOL
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "kimi_k2" and saved["auto_map"] == auto_map
    assert saved["architectures"] == ["DeepseekV3ForCausalLM"]
    with safe_open(str(tmp_path / "kimi" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())


def test_transformers_default_glm4_moe_lite_config_counts_as_the_preset(tmp_path):
    """transformers' default Glm4MoeLiteConfig is GLM-4.7-Flash's shape: sized by `seekmoe info`, never built."""
    from transformers import Glm4MoeLiteConfig

    (tmp_path / "config.json").write_text(Glm4MoeLiteConfig().to_json_string())
    theirs = model_summary(ModelConfig.from_json_file(tmp_path))
    preset = model_summary(ModelConfig.preset("glm-4.7-flash"))
    assert theirs["total_params"] == preset["total_params"]
    assert theirs["active_params"] == preset["active_params"]


def _billions(name: str) -> tuple[float, float, float]:
    s = model_summary(ModelConfig.preset(name))
    return s["total_params"] / 1e9, s["active_params"] / 1e9, s["embedding_params"] / 1e9


def test_deepseek_moe_16b_preset_counts_16_4b_total_2_8b_active_with_multi_head_attention():
    config = ModelConfig.preset("deepseek-moe-16b")
    assert not config.use_mla and config.mha_head_dim == 128 and config.model_type == "deepseek_ocr2_text"
    total, active, _ = _billions("deepseek-moe-16b")
    assert round(total, 1) == 16.4 and round(active, 1) == 2.8


def test_kimi_k2_preset_counts_1t_total_32b_active():
    total, active, _ = _billions("kimi-k2")
    assert 1000 < total < 1050 and 32 < active < 33.5
    assert ModelConfig.preset("kimi-k2").to_dict()["model_type"] == "kimi_k2"


def test_moonlight_preset_counts_15_29b_total_2_24b_active_without_embeddings():
    """Moonlight's published 15.29B / 2.24B leave out the input embedding and the output head."""
    total, active, embedding = _billions("moonlight-16b-a3b")
    assert round(total - 2 * embedding, 2) == 15.29 and round(active - 2 * embedding, 2) == 2.24


def test_glm_4_7_flash_preset_counts_30b_total_3b_active():
    s = model_summary(ModelConfig.preset("glm-4.7-flash"))
    assert 29.5e9 < s["total_params"] < 30.5e9 and 30.5e9 < s["total_params"] + s["mtp_params"] < 31e9
    assert 3e9 < s["active_params"] - 2 * s["embedding_params"] < 4e9


# deepseek-ai/deepseek-moe-16b-base's config.json (model_type "deepseek": its own remote code, multi-head attention)
DEEPSEEK_MOE_16B = {
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 4096, "model_type": "deepseek", "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
    "vocab_size": 102400}


def test_deepseek_moe_16b_config_json_reads_as_the_preset_and_writes_back_its_model_type():
    config = ModelConfig.from_dict(DEEPSEEK_MOE_16B)
    assert not config.use_mla and not config.rope_interleave and config.model_type == "deepseek"
    preset = ModelConfig.preset("deepseek-moe-16b")
    assert model_summary(config)["total_params"] == model_summary(preset)["total_params"]
    written = config.to_dict()
    assert written["model_type"] == "deepseek" and written["auto_map"] == DEEPSEEK_MOE_16B["auto_map"]
    assert written["architectures"] == ["DeepseekForCausalLM"] and written["head_dim"] == 128
    assert ModelConfig.from_dict(written) == config


def test_multi_head_deepseek_v2_language_config_keeps_use_mla_false():
    """DeepSeek-VL2-Tiny's language model: a deepseek_v2 config with use_mla false."""
    d = {**DEEPSEEK_MOE_16B, "model_type": "deepseek_v2", "use_mla": False, "num_hidden_layers": 12,
         "hidden_size": 1280, "num_attention_heads": 10, "num_key_value_heads": 10}
    d.pop("auto_map")
    config = ModelConfig.from_dict(d)
    assert not config.use_mla and config.mha_head_dim == 128 and config.model_type == "deepseek_v2"
    written = config.to_dict()
    assert written["use_mla"] is False and written["model_type"] == "deepseek_v2"
    assert ModelConfig.from_dict(written) == config
