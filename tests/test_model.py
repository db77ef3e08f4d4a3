"""Model behaviour beyond parity: losses, gradients, expert counts, meta-device builds."""

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig


def test_every_parameter_gets_a_gradient_from_the_loss(tiny_config):
    torch.manual_seed(0)
    model = seekmoe.build_model(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 32))
    out = model(ids, labels=ids)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_loss_is_lm_plus_weighted_mtp_plus_balance(tiny_config):
    config = tiny_config.replace(mtp_loss_weight=0.5, aux_loss_alpha=0.01, router_z_loss_coef=0.001,
                                 expert_balance_alpha=0.01, device_balance_alpha=0.01)
    torch.manual_seed(0)
    model = seekmoe.build_model(config).train()
    ids = torch.randint(0, config.vocab_size, (3, 20))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mtp_loss + out.balance_loss)
    assert out.balance_loss > 0 and out.mtp_loss > 0
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)


def test_expert_counts_cover_every_token_slot(tiny_config):
    model = seekmoe.build_model(tiny_config).train()
    B, S = 2, 16
    ids = torch.randint(0, tiny_config.vocab_size, (B, S))
    out = model(ids, labels=ids)
    k = tiny_config.num_experts_per_tok
    # Main MoE layers see B*S tokens; the depth-1 MTP module sees B*(S-1).
    n_main = sum(tiny_config.is_moe_layer(i) for i in range(tiny_config.num_hidden_layers))
    assert out.expert_counts.shape == (n_main + tiny_config.num_nextn_predict_layers, tiny_config.n_routed_experts)
    assert (out.expert_counts[:n_main].sum(-1) == B * S * k).all()
    assert (out.expert_counts[n_main:].sum(-1) == B * (S - 1) * k).all()


def test_mtp_predicts_tokens_further_ahead(tiny_config):
    """Depth-1 MTP at position i is trained on token i+2: a sequence where t_{i+2} = t_i makes it learnable."""
    torch.manual_seed(0)
    model = seekmoe.build_model(tiny_config.replace(mtp_loss_weight=1.0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.randint(2, tiny_config.vocab_size, (8, 2))
    ids = pattern.repeat(1, 16)  # a b a b ...
    first = None
    for _ in range(40):
        out = model(ids, labels=ids)
        first = first if first is not None else out.mtp_loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.mtp_loss.item() < 0.5 * first


def test_deepseek_v3_builds_on_meta_device_without_memory():
    model = seekmoe.build_model(ModelConfig.preset("deepseek-v3"), device="meta")
    total = sum(p.numel() for n, p in model.named_parameters() if ".mtp." not in n)
    assert round(total / 1e9, 1) == 671.0
    assert all(p.is_meta for p in model.parameters())


def test_info_reports_deepseek_v3_figures(capsys):
    import json

    from seekmoe.cli import main

    assert main(["info", "--preset", "deepseek-v3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["total_params"] / 1e9, 1) == 671.0
    assert round(info["active_params"] / 1e9, 1) == 37.6
    assert info["kv_cache_bytes_per_token"] == (512 + 64) * 61 * 2
    assert info["mha_kv_cache_bytes_per_token"] == 128 * (192 + 128) * 61 * 2


def test_info_on_missing_model_dir_is_a_clean_error(tmp_path, capsys):
    from seekmoe.cli import main

    assert main(["info", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bf16_autocast_forward_runs_and_stays_close(tiny_config):
    torch.manual_seed(0)
    model = seekmoe.build_model(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids).logits
    assert got.dtype == torch.bfloat16
    # bf16 rounding can flip a near-tied routing choice, so compare on average, not worst case.
    assert ((got.float() - ref).abs().mean() / ref.abs().mean()) < 0.03


def test_from_pretrained_on_meta_builds_a_671b_model_from_config_json_alone(tmp_path):
    ModelConfig.preset("deepseek-v3").save(tmp_path)
    model = seekmoe.from_pretrained(tmp_path, device="meta")
    assert model.config.n_routed_experts == 256
    assert len(model.model.mtp) == 1 and all(p.is_meta for p in model.parameters())


def test_checkpoint_missing_a_tensor_is_a_clear_error(tiny_config, tmp_path):
    import pytest
    from safetensors.torch import load_file, save_file

    seekmoe.build_model(tiny_config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensors"):
        seekmoe.from_pretrained(tmp_path)


def test_save_then_load_round_trips_exactly_with_mtp_and_bias(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = seekmoe.build_model(tiny_config)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    loaded = seekmoe.from_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v4"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_the_names(preset):
    """Applied from outside (parallel/compile.py), checkpointing changes neither the gradients, nor the parameter
    names and state-dict keys, nor eval-mode scoring; V4's blocks carry hyper-connection streams."""
    from seekmoe.model.experts import grouped_mm_supported
    from seekmoe.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    config = seekmoe.ModelConfig.preset(preset)
    model = seekmoe.build_model(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}  # None for parameters no loss reaches (V4's)
    assert sum(g is not None for g in expected.values()) > len(expected) // 2
    keys = list(model.state_dict())
    with torch.no_grad():
        logits = model.eval()(ids).logits
    model.train().zero_grad(set_to_none=True)
    grouped_mm_supported.cache_clear()  # the backend probe must not disturb a checkpointed first forward
    apply_activation_checkpointing(model)
    model(ids, labels=ids).loss.backward()
    assert [n for n, _ in model.named_parameters()] == list(expected) and list(model.state_dict()) == keys
    for n, p in model.named_parameters():
        if expected[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, expected[n], rtol=0, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, logits, rtol=0, atol=0)


def test_activation_checkpointing_keeps_less_and_recomputes_each_block_in_the_backward(tiny_config):
    """Only each block's inputs are kept for the backward, where its forward runs again inside the block's own hooks
    (which FSDP2 unshards in), as torchtitan wraps them."""
    from seekmoe.parallel import apply_activation_checkpointing

    model = seekmoe.build_model(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 32))
    calls, saved = [], []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: calls.append("block"))
        block.self_attn.register_forward_pre_hook(lambda module, args: calls.append("attn"))

    def kept_bytes() -> tuple[int, torch.Tensor]:  # what autograd keeps from the forward (a checkpoint keeps its own inside)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = model(ids, labels=ids).loss
        return sum(saved), loss

    plain, _ = kept_bytes()
    apply_activation_checkpointing(model)
    calls.clear()
    checkpointed, loss = kept_bytes()
    assert checkpointed < 0.8 * plain
    L = tiny_config.num_hidden_layers
    assert calls.count("block") == calls.count("attn") == L
    loss.backward()
    assert calls.count("block") == L and calls.count("attn") == 2 * L
