"""DeepSeek-V4 (model_type deepseek_v4) against transformers' DeepseekV4ForCausalLM: logits on tiny random configs in
fp32 (sequences past the sliding window, several compressed windows, the indexer's top-k binding), folders both
ways, hostile configs, presets and their counts, MXFP4 dequantization against the format's definition."""

from __future__ import annotations

import json

import pytest
import torch

from hf_oracle import rel_error
from seekmoe import ModelConfig, from_pretrained
from seekmoe.model import CausalLM

LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
          "compressed_sparse_attention"]


def v4_hf_config(**overrides):
    """A transformers DeepseekV4Config small enough for CPU tests, with every layer kind and a hash layer."""
    from transformers import DeepseekV4Config

    kw = dict(vocab_size=80, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
              head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=6, n_shared_experts=1,
              layer_types=LAYERS, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
              sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=3,
              partial_rotary_factor=0.5, hc_mult=2, hc_sinkhorn_iters=6, swiglu_limit=0.8,
              max_position_embeddings=256)
    kw.update(overrides)
    return DeepseekV4Config(**kw)


def v4_hf_model(config, seed: int = 0):
    """transformers' V4 with every tensor random (its initialization leaves sinks, biases and the hash table at 0)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(config.n_routed_experts)[:b.shape[1]] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


@pytest.fixture(scope="module")
def v4_folder(tmp_path_factory):
    """(a folder transformers saved, its model)."""
    hf = v4_hf_model(v4_hf_config())
    path = tmp_path_factory.mktemp("v4") / "hf"
    hf.save_pretrained(path)
    return path, hf


def test_logits_equal_transformers_past_the_window_and_the_indexer_top_k(v4_folder):
    path, hf = v4_folder
    ours = from_pretrained(path)
    assert ours.config.model_type == "deepseek_v4" and ours.config.is_v4
    ids = torch.randint(0, 80, (2, 41), generator=torch.Generator().manual_seed(1))  # 5x the window, 10 CSA windows
    with torch.no_grad():
        assert rel_error(ours(ids).logits, hf(ids).logits) < 2e-4


def test_the_indexer_and_window_really_choose(v4_folder):
    """The test above is not vacuous: fewer than all compressed windows are selected, and the window cuts keys."""
    path, _ = v4_folder
    ours = from_pretrained(path)
    attn = ours.model.layers[1].self_attn
    x = torch.randn(1, 41, 32)
    cos, sin = ours.model.rotary_emb(torch.arange(41))
    _, q_latent = attn.query(x, cos[1], sin[1])
    indexer = attn.compressor.indexer
    keys = indexer(x, ours.model.rotary_emb.inv_freq[1])
    top = indexer.select(x, q_latent, keys, torch.arange(41).expand(1, 41), cos[1], sin[1])
    assert keys.shape[1] == 10 and top.shape[-1] == 3
    assert (top[0, -1] >= 0).all() and (top[0, :3] == -1).all()  # the first window closes at token 3


def test_a_folder_seekmoe_saves_is_the_one_transformers_saves_and_reloads(v4_folder, tmp_path):
    from safetensors import safe_open
    from transformers import DeepseekV4ForCausalLM

    path, hf = v4_folder
    ours = from_pretrained(path)
    ours.save_pretrained(tmp_path / "ours")
    keys = {}
    for folder in (path, tmp_path / "ours"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys[folder] = set(f.keys())
    assert keys[path] == keys[tmp_path / "ours"]
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v4" and saved["layer_types"] == LAYERS
    back = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 80, (1, 30))
    with torch.no_grad():
        assert rel_error(back(ids).logits, hf(ids).logits) < 1e-6


def test_release_names_and_legacy_config_keys_load(v4_folder, tmp_path):
    """DeepSeek's release spelling: no `model.` prefix, embed/head/norm/hc_head_fn, an MTP key past the configured
    depth (skipped; test_v4_mtp.py loads whole MTP modules), compress_ratios and num_hash_layers instead of
    layer_types and mlp_layer_types, a flat rope_scaling."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, hf = v4_folder
    release = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            name = key.removeprefix("model.")
            name = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base":
                    "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}.get(name, name)
            release[name] = f.get_tensor(key)
    release["mtp.0.enorm.weight"] = torch.ones(32)
    (tmp_path / "rel").mkdir()
    save_file(release, str(tmp_path / "rel" / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"):
        config.pop(key)
    config.update(compress_ratios=[0, 4, 8, 4, 0], compress_rate_hca=8, num_hash_layers=1, num_nextn_predict_layers=0)
    (tmp_path / "rel" / "config.json").write_text(json.dumps(config))
    ours = from_pretrained(tmp_path / "rel")
    assert ours.config.layer_types == LAYERS and ours.config.mlp_layer_types[:2] == ["hash_moe", "moe"]
    ids = torch.randint(0, 80, (1, 25))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, hf(ids).logits) < 2e-4


def test_yarn_on_the_compressed_branches_equals_transformers(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1}
    hf = v4_hf_model(v4_hf_config(rope_parameters=rope, num_hidden_layers=3, layer_types=LAYERS[:3],
                                  mlp_layer_types=["moe"] * 3), seed=3)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.rope_scaling["factor"] == 4.0
    ids = torch.randint(0, 80, (1, 33))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, hf(ids).logits) < 2e-4


def test_a_hash_table_entry_out_of_range_is_refused(v4_folder, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _ = v4_folder
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((path / "config.json").read_text())
    tensors["model.layers.0.ffn.gate.tid2eid"][5, 1] = 6
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tid2eid\[5, 1\]=6 is out of range"):
        from_pretrained(tmp_path / "bad")
    del tensors["model.layers.0.ffn.gate.tid2eid"]
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks tensors.*gate.tid2eid"):
        from_pretrained(tmp_path / "bad")


@pytest.mark.parametrize("change, field", [
    (dict(layer_types=LAYERS[:3]), "layer_types"),
    (dict(layer_types=LAYERS[:3] + ["full_attention"]), "layer_types"),
    (dict(mlp_layer_types=["moe", "hash", "moe", "moe"]), "mlp_layer_types"),
    (dict(scoring_func="sqrt_softplus"), "scoring_func"),
    (dict(compress_rates={"compressed_sparse_attention": 4}), "compress_rates"),
    (dict(o_groups=3), "o_groups"),
    (dict(first_k_dense_replace=1), "first_k_dense_replace"),
])
def test_hostile_v4_configs_name_the_field(change, field):
    base = ModelConfig.preset("tiny-v4", layer_types=LAYERS, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                              num_hidden_layers=4)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        base.replace(**change)


def test_a_config_json_with_wrong_layer_types_fails_naming_the_field(v4_folder, tmp_path):
    path, _ = v4_folder
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = LAYERS[:2]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_json_file(tmp_path)


def test_v3_configs_are_unchanged_by_the_v4_fields():
    d = ModelConfig.preset("tiny").to_dict()
    assert not {"layer_types", "head_dim", "hc_mult", "swiglu_limit"} & set(d)
    assert ModelConfig.from_dict(d) == ModelConfig.preset("tiny")


def test_transformers_default_config_counts_as_the_flash_preset():
    """transformers' default DeepseekV4Config, shortened to 4 layers (its default schedule: HCA, HCA, HCA, CSA; 3
    hash layers), has our count layer for layer; the full preset counts V4-Flash's 284.3B (MTP apart)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from seekmoe.info import model_summary

    with torch.device("meta"):
        hf = DeepseekV4ForCausalLM(DeepseekV4Config(num_hidden_layers=4))
    ours = ModelConfig.from_dict(hf.config.to_dict())
    assert ours.to_dict()["layer_types"] == hf.config.layer_types
    assert model_summary(ours)["total_params"] == sum(p.numel() for p in hf.parameters())
    flash = model_summary(ModelConfig.preset("deepseek-v4-flash"))
    assert round(flash["total_params"] / 1e9, 1) == 284.3 and round(flash["active_params"] / 1e9) == 14
    pro = model_summary(ModelConfig.preset("deepseek-v4-pro"))
    assert round(pro["total_params"] / 1e12, 1) == 1.6 and round(pro["active_params"] / 1e9) in (49, 50)


def test_tiny_v4_trains_a_few_steps():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.preset("tiny-v4")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (2, 48))
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.model.layers[0].mlp.gate.tid2eid.grad is None  # the table is a buffer, never trained


def test_clamped_swiglu_is_bit_identical_when_off_and_its_gradient_matches_autograd():
    from seekmoe.model.grouped_swiglu import clamp_gate_up, grouped_swiglu

    torch.manual_seed(0)
    rows, weights = torch.randn(10, 8) * 3, torch.rand(10)
    gate_up, down = torch.randn(2, 16, 8, requires_grad=True), torch.randn(2, 8, 8, requires_grad=True)
    offsets = torch.tensor([4, 10], dtype=torch.int32)
    for layout in ("ragged", "padded"):
        plain = grouped_swiglu(rows, weights, gate_up, down, offsets, layout)[0]
        assert torch.equal(plain, grouped_swiglu(rows, weights, gate_up, down, offsets, layout, None)[0])
        r = rows.clone().requires_grad_()
        y = grouped_swiglu(r, weights, gate_up, down, offsets, layout, 1.5)[0]
        grads = torch.autograd.grad((y * y).sum(), (r, gate_up, down))
        r2 = rows.clone().requires_grad_()
        ref = []
        for e, (lo, hi) in enumerate([(0, 4), (4, 10)]):
            h = r2[lo:hi] @ gate_up[e].T
            g, u = clamp_gate_up(*h.chunk(2, dim=-1), 1.5)
            ref.append((torch.nn.functional.silu(g) * u * weights[lo:hi, None]) @ down[e].T)
        ref = torch.cat(ref)
        assert torch.allclose(y, ref, atol=1e-5)
        for a, b in zip(grads, torch.autograd.grad((ref * ref).sum(), (r2, gate_up, down))):
            assert torch.allclose(a, b, atol=1e-4)


# OCP MX v1.0 section 5.3.3: the FP4 (E2M1) code points, written out.
E2M1 = {0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0}
E2M1.update({code | 0b1000: -value for code, value in E2M1.items()})


def test_mxfp4_dequantization_follows_the_format_definition():
    from seekmoe.checkpoint import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (3, 32), dtype=torch.uint8, generator=g)  # 3 rows of 64 values
    exponents = torch.randint(120, 134, (3, 2), dtype=torch.uint8, generator=g)  # E8M0: 2^(e - 127)
    ref = torch.empty(3, 64)
    for r in range(3):
        for i in range(64):
            byte = int(packed[r, i // 2])
            code = byte & 0xF if i % 2 == 0 else byte >> 4  # element 2k in the low nibble
            ref[r, i] = E2M1[code] * 2.0 ** (int(exponents[r, i // 32]) - 127)
    assert torch.equal(dequantize_mxfp4(packed, exponents), ref)
    assert torch.equal(dequantize_mxfp4(packed.view(torch.int8), exponents.view(torch.float8_e8m0fnu)), ref)
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert torch.equal(dequantize_mxfp4(packed.view(torch.float4_e2m1fn_x2), exponents), ref)


def test_mxfp4_experts_load_dequantized(v4_folder, tmp_path):
    """A folder whose routed experts are MXFP4 (int8 nibbles, `.scale` E8M0 bytes, as V4's release) loads with each
    expert equal to the dequantization of what was written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from seekmoe.checkpoint import dequantize_mxfp4, quantize_mxfp4

    path, _ = v4_folder
    tensors, expected = {}, {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if ".ffn.experts." in key and t.shape[-1] % 32 == 0:
                packed, scale = quantize_mxfp4(t)
                tensors[key], tensors[key.removesuffix("weight") + "scale"] = packed.view(torch.int8), scale
                expected[key] = dequantize_mxfp4(packed, scale)
            else:
                tensors[key] = t
    assert expected  # the gate/up projections (hidden 32 wide) are quantized
    (tmp_path / "q").mkdir()
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    (tmp_path / "q" / "config.json").write_text((path / "config.json").read_text())
    ours = from_pretrained(tmp_path / "q", dtype=torch.float32)
    experts = ours.model.layers[2].mlp.experts
    assert torch.equal(experts.gate_up_proj[3, :16], expected["model.layers.2.ffn.experts.3.w1.weight"])
    assert torch.equal(experts.gate_up_proj[3, 16:], expected["model.layers.2.ffn.experts.3.w3.weight"])


def test_greedy_decoding_on_v4_caches_equals_transformers_generate(v4_folder):
    """A 13-token prefill, then 20 tokens one at a time through each layer's V4LayerCache (window, compressed keys,
    the indexer's keys): CSA and HCA windows close mid-decoding, the indexer's top-k binds."""
    from seekmoe.model.v4_cache import V4LayerCache

    path, hf = v4_folder
    ours = from_pretrained(path)
    prompt = torch.randint(0, 80, (1, 13), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    caches = [V4LayerCache(ours.config.sliding_window) for _ in ours.model.layers]
    with torch.no_grad():
        tokens = [ours(prompt, position_ids=torch.arange(13), cache=caches).logits[:, -1].argmax(-1)]
        for t in range(13, 32):
            logits = ours(tokens[-1][:, None], position_ids=torch.tensor([t]), cache=caches).logits
            tokens.append(logits[:, -1].argmax(-1))
    assert torch.equal(torch.cat([prompt, torch.stack(tokens, 1)], 1), ref)
    assert caches[2].compressor.keys.shape[1] == 32 // 8 and caches[1].indexer.keys.shape[1] == 32 // 4
    # `seekmoe info`'s arithmetic is what these caches hold (fp32, one sequence, 32 tokens)
    from seekmoe.info import v4_cache_bytes

    assert sum(c.nbytes() for c in caches) == v4_cache_bytes(ours.config, 32, 4)


def test_the_engine_decodes_v4_equal_to_transformers_generate(v4_folder):
    """seekmoe's Engine (continuous batching: 3 prompts of 6-21 tokens in 2 slots, each at its own position) on
    V4's per-token cache widths: every greedy continuation equals transformers' generate."""
    from seekmoe.inference import Engine, SamplingParams

    path, hf = v4_folder
    hf.generation_config.eos_token_id = None
    prompts = [torch.randint(0, 80, (1, n), generator=torch.Generator().manual_seed(n)) for n in (13, 6, 21)]
    refs = [hf.generate(p, max_new_tokens=14, do_sample=False)[0, p.shape[1]:].tolist() for p in prompts]
    engine = Engine(from_pretrained(path), max_batch_size=2, compile=False)
    done = engine.generate([p[0].tolist() for p in prompts],
                           SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True))
    assert [r.output_ids for r in done] == refs


def test_fp8_weights_with_e8m0_block_scales_load_as_the_release_ships_them(v4_folder, tmp_path):
    """V4's release: attention matrices in float8_e4m3fn with a power-of-two (E8M0) scale per 128x128 block under
    `.scale`; loaded as the dequantized product."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from seekmoe.checkpoint import quantize_fp8

    path, _ = v4_folder
    tensors = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    key = "model.layers.1.attn.wq_b.weight"
    q, scale_inv = quantize_fp8(tensors[key])
    scale = torch.exp2(torch.ceil(torch.log2(scale_inv)))  # E8M0 holds powers of two only
    tensors[key] = (tensors[key] / scale).to(torch.float8_e4m3fn)
    tensors[key.removesuffix("weight") + "scale"] = scale.to(torch.float8_e8m0fnu)
    (tmp_path / "fp8").mkdir()
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text((path / "config.json").read_text())
    ours = from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    want = tensors[key].float() * scale.float()
    assert torch.equal(ours.model.layers[1].self_attn.q_b_proj.weight, want)


def test_seekmoe_train_runs_the_tiny_v4_preset_and_transformers_loads_the_result(tmp_path):
    import inspect

    from transformers import DeepseekV4ForCausalLM

    from seekmoe.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i, module in enumerate((json.decoder, json.encoder, inspect)):  # a few small real documents
        (data / f"{i}.py").write_text(inspect.getsource(module)[:6000])
    args = ["train", "--preset", "tiny-v4", "--out", str(tmp_path / "run"), "--data", str(data), "--max-steps",
            "3", "seq_len=48", "batch_size=2", "warmup_steps=1", "eval_every=3", "save_every=3", "eval_batches=1",
            f"cache_dir={tmp_path / 'cache'}", "precision=fp32"]
    assert main(args) == 0
    ours = from_pretrained(tmp_path / "run" / "final")
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, hf(ids).logits) < 2e-4


def test_packed_examples_are_refused_with_one_clear_error():
    model = CausalLM(ModelConfig.preset("tiny-v4")).eval()
    ids = torch.randint(0, 512, (1, 8))
    causal = torch.ones(8, 8, dtype=torch.bool).tril().view(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(ids, attn_mask=causal).logits, model(ids).logits)
        packed = causal.clone()
        packed[..., 4:, :4] = False  # two examples of 4 tokens
        with pytest.raises(ValueError, match="one sequence per row"):
            model(ids, attn_mask=packed)
