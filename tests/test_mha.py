"""Multi-head attention (`use_mla: false`): numerics equal transformers' DeepSeek-OCR-2 text model (a DeepSeek-V2
MoE with standard attention) on tiny random configs in fp32; folders saved either way load in the other."""

import json

import pytest
import torch
from safetensors.torch import save_file

import seekmoe
from seekmoe import ModelConfig
from hf_oracle import YARN, rel_error

pytest.importorskip("transformers")
TOL = 2e-4

VARIANTS = {
    "greedy_yarn": dict(topk_method="greedy", rope_parameters=dict(YARN)),
    "group_limited_bias": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, attention_bias=True),
}


def hf_text_config(**overrides):
    """A transformers DeepseekOcr2TextConfig small enough for CPU tests."""
    from transformers import DeepseekOcr2TextConfig

    kwargs = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  routed_scaling_factor=1.5, mlp_layer_types=["dense", "sparse", "sparse"], initializer_range=0.1,
                  max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return DeepseekOcr2TextConfig(**kwargs)


def hf_text_model(config):
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = DeepseekOcr2TextModel(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def _ids(vocab: int, seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def random_ours(config: ModelConfig, seed: int = 0) -> seekmoe.CausalLM:
    torch.manual_seed(seed)
    model = seekmoe.build_model(config.replace(initializer_range=0.1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_text_model_folder_loads_with_equal_logits(variant, tmp_path):
    """transformers' weights and config.json (plus an output head, which its text model lacks) read by seekmoe."""
    ref = hf_text_model(hf_text_config(**VARIANTS[variant]))
    torch.manual_seed(1)
    head = torch.randn(ref.config.vocab_size, ref.config.hidden_size) * 0.1
    state = {f"model.{k}": v.contiguous() for k, v in ref.state_dict().items()} | {"lm_head.weight": head}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    assert not ours.config.use_mla and ours.config.model_type == "deepseek_ocr2_text"
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids).last_hidden_state @ head.T
        err = rel_error(ours(ids).logits, want)
    print(f"largest relative logit error [transformers -> seekmoe, {variant}]: {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_multi_head_model_reloads_in_transformers_with_equal_logits(variant, tmp_path):
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

    config = ModelConfig.from_dict(hf_text_config(**VARIANTS[variant]).to_dict())
    ours = random_ours(config)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_ocr2_text" and saved["use_mla"] is False
    assert saved["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    theirs = DeepseekOcr2TextModel.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = _ids(config.vocab_size)
    with torch.no_grad():
        want = ours(ids).logits
        err = rel_error(ours.lm_head(theirs(ids).last_hidden_state), want)
        back = rel_error(seekmoe.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits, want)
    print(f"largest relative logit error [save -> transformers, {variant}]: {err:.2e}")
    assert err < TOL and back == 0


def test_multi_head_config_checks_name_the_field():
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig.preset("tiny", use_mla=False, num_attention_heads=5)
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.preset("tiny", attention_bias=True)
    with pytest.raises(ValueError, match="use_mla"):
        ModelConfig.preset("tiny", use_mla="no")
    with pytest.raises(ValueError, match="family"):
        ModelConfig.preset("tiny", family="llama")
    with pytest.raises(ValueError, match="use_mla"):
        ModelConfig.preset("tiny", family="deepseek")  # DeepSeekMoE's remote code is multi-head attention
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict({**hf_text_config().to_dict(), "num_key_value_heads": 2})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ModelConfig.from_dict({**hf_text_config().to_dict(), "mlp_layer_types": ["sparse", "dense", "sparse"]})


def ocr2_generation_model(ours: seekmoe.CausalLM):
    """transformers' DeepSeek-OCR-2 (a vision tower far smaller than the release's) whose language model and head
    hold `ours`'s weights: its `generate` on text alone is the decoding oracle."""
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    text = ours.config.to_dict()
    vision = dict(sam_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                  global_attn_indexes=[0]),
                  encoder_config=dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    config = DeepseekOcr2Config(text_config=text, vision_config=vision, image_token_id=ours.config.vocab_size - 1)
    config._attn_implementation = "eager"
    model = DeepseekOcr2ForConditionalGeneration(config).float().eval()
    state = {k[len("model."):]: v for k, v in ours.state_dict().items() if k.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    assert not missing and all("rotary_emb" in k for k in unexpected), (missing, unexpected)
    model.lm_head.load_state_dict(ours.lm_head.state_dict())
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_decoding_through_our_cache_equals_transformers_generate(variant):
    from seekmoe.inference import Engine, SamplingParams

    config = ModelConfig.from_dict({**hf_text_config(**VARIANTS[variant]).to_dict(), "eos_token_id": None})
    ours = random_ours(config)
    theirs = ocr2_generation_model(ours)
    prompts = [_ids(config.vocab_size - 1, seed, (1, n))[0].tolist() for seed, n in ((2, 9), (3, 4))]
    params = SamplingParams(max_new_tokens=14, temperature=0)
    got = Engine(ours, max_batch_size=2).generate(prompts, params)  # one batch: two lengths, two slots
    for prompt, result in zip(prompts, got):
        with torch.no_grad():
            want = theirs.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False)[0, len(prompt):]
        assert result.output_ids == want.tolist()


def test_compiled_speculative_decoding_of_a_multi_head_model_gives_eager_tokens(monkeypatch):
    """The multi-head cache's update compiles in one graph (aot_eager: inductor's graphs, captured fast), the MTP
    module's attention included."""
    from torch._dynamo.utils import counters

    from seekmoe.inference import Engine, SamplingParams, compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset("tiny", use_mla=False, rope_interleave=False)).eval()
    prompts, params = [[0, 5, 6, 7, 8, 9, 10], [0, 40]], SamplingParams(max_new_tokens=12, temperature=0,
                                                                        ignore_eos=True)
    want = [r.output_ids for r in Engine(model, max_batch_size=2, compile=False).generate(prompts, params)]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, max_batch_size=2, speculative="mtp", compile=True)
    assert [r.output_ids for r in engine.generate(prompts, params)] == want
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_info_counts_the_multi_head_cache_and_a_decode_cache_holds_exactly_that():
    from seekmoe.inference import DecodeCache
    from seekmoe.info import format_summary, model_summary

    s = model_summary(ModelConfig.preset("deepseek-moe-16b"))
    assert s["attention"] == "mha" and s["kv_cache_bytes_per_token"] == 2 * 16 * 128 * 28 * 2  # keys + values, bf16
    assert "multi-head attention" in format_summary("deepseek-moe-16b", s)
    config = ModelConfig.preset("tiny", use_mla=False, rope_interleave=False)
    model = seekmoe.build_model(config)
    assert model.model.layers[0].self_attn.cache_widths() == {"k": 64, "v": 64}
    cache = DecodeCache.for_model(model, 1, 8, torch.bfloat16)
    assert cache.bytes_per_token() == model_summary(config)["kv_cache_bytes_per_token"]
