"""LoRA and QLoRA: adapters in PEFT's format that peft + transformers load with seekmoe's logits, `seekmoe merge`
equal to applying the adapter (the base folder byte-identical), expert adapters through the grouped GEMMs equal to a
per-expert loop, bad options refused before anything is written, and a tiny LoRA fine-tuning run."""

from __future__ import annotations

import hashlib
import json
import zlib

import pytest
import torch
import torch.nn.functional as F

import seekmoe
from hf_oracle import hf_config, hf_model, rel_error
from seekmoe.cli import main
from seekmoe.lora import (LoRAConfig, LoRAExperts, apply_lora, attach_adapter, lora_parameters, merge_adapter,
                          save_adapter)
from seekmoe.model.dispatch import LocalDispatcher
from seekmoe.model.experts import RoutedExperts

EVERY_TARGET = "attention,shared-experts,experts,dense-mlp,router"


def _folder_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _adapted(folder, model_type: str):
    """A tiny DeepSeek folder written by transformers, its seekmoe model adapted on every target with random factors
    (B nonzero) and moved selection biases, and that adapter saved: (folder, ids, the adapted logits, model)."""
    hf_model(hf_config(model_type)).save_pretrained(folder / "base")
    model = seekmoe.from_pretrained(folder / "base").float().eval()
    config = LoRAConfig(rank=4, alpha=6.0, targets=EVERY_TARGET)
    apply_lora(model, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn(b.shape, generator=g) * 0.02)  # as the auxiliary-loss-free rule moves them
    save_adapter(folder / "adapter", lora_parameters(model), config, model.config, base=str(folder / "base"))
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
    return folder, ids, logits, model


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """`_adapted` for DeepSeek-V3."""
    return _adapted(tmp_path_factory.mktemp("lora_v3"), "deepseek_v3")


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def adapted_any(request, adapted, tmp_path_factory):
    """`_adapted` for each model type transformers has (V2: softmax routers, no selection bias)."""
    if request.param == "deepseek_v3":
        return adapted
    return _adapted(tmp_path_factory.mktemp("lora_v2"), request.param)


def test_peft_and_transformers_load_the_adapter_with_seekmoe_logits(adapted_any):
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    folder, ids, ours, _ = adapted_any
    base = AutoModelForCausalLM.from_pretrained(folder / "base", attn_implementation="eager").float().eval()
    model = peft.PeftModel.from_pretrained(base, folder / "adapter").eval()
    with torch.no_grad():
        ref = model(ids).logits
    assert rel_error(ours, ref) < 1e-4
    # Every tensor of the file found its place: the fused experts (both stacks), MLPs, attention and routers.
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"][:2] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["modules_to_save"] == ["gate"]


def test_merge_equals_applying_the_adapter_and_never_writes_the_base(adapted, tmp_path):
    folder, ids, ours, _ = adapted
    before = _folder_digest(folder / "base")
    assert main(["merge", "--model", str(folder / "base"), "--adapter", str(folder / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert _folder_digest(folder / "base") == before
    merged = seekmoe.from_pretrained(tmp_path / "merged").eval()
    applied = seekmoe.from_pretrained(folder / "base").eval()
    attach_adapter(applied, folder / "adapter")
    with torch.no_grad():
        assert rel_error(merged(ids).logits, applied(ids).logits) < 1e-5
        assert rel_error(merged(ids).logits, ours) < 1e-5
    # The merged folder is a plain model: transformers loads it without peft.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert rel_error(hf(ids).logits, ours) < 1e-4


def test_merge_refuses_an_out_inside_the_base_and_a_foreign_adapter(adapted, tmp_path, capsys):
    folder, _, _, _ = adapted
    before = _folder_digest(folder / "base")
    assert main(["merge", "--model", str(folder / "base"), "--adapter", str(folder / "adapter"),
                 "--out", str(folder / "base" / "merged")]) == 2
    assert "inside the base folder" in capsys.readouterr().err
    assert _folder_digest(folder / "base") == before and not (folder / "base" / "merged").exists()
    other = tmp_path / "other"
    hf_model(hf_config(n_routed_experts=4, n_group=2, topk_group=1)).save_pretrained(other)
    assert main(["merge", "--model", str(other), "--adapter", str(folder / "adapter"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "shape" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_cached_decoding_sees_the_adapted_projections(adapted, tmp_path):
    """Absorbed MLA decoding reads kv_b_proj's matrix: an adapted model decodes as its merged folder does."""
    from seekmoe.inference.engine import Engine
    from seekmoe.inference.sampling import SamplingParams

    folder, ids, _, model = adapted
    merge_adapter(folder / "base", folder / "adapter", tmp_path / "merged")
    merged = seekmoe.from_pretrained(tmp_path / "merged")
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompt = ids[0, :5].tolist()
    ours = Engine(model, max_batch_size=1, compile=False).generate([prompt], greedy)[0].output_ids
    ref = Engine(merged, max_batch_size=1, compile=False).generate([prompt], greedy)[0].output_ids
    assert ours == ref and len(ours) == 12


def test_adapted_model_starts_where_its_base_stands():
    torch.manual_seed(0)
    model = seekmoe.build_model(seekmoe.ModelConfig.preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        adapted = apply_lora(model, LoRAConfig(rank=2, targets=EVERY_TARGET))
        after = model(ids).logits
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(n for n in lora_parameters(model) if not n.endswith("e_score_correction_bias"))
    assert adapted.trainable_params < adapted.total_params / 4


E, H, I, T, TOP_K, R = 6, 16, 8, 40, 2, 3


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
def test_expert_lora_gradients_through_the_grouped_path_equal_a_per_expert_loop(backend):
    g = torch.Generator().manual_seed(zlib.crc32(backend.encode()))
    experts = RoutedExperts(E, H, I, backend=backend)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=g) / I**0.5)
    experts.requires_grad_(False)
    lora = LoRAExperts(E, H, I, R, scaling=1.5)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    experts.add_provider("lora", lora)
    x = torch.randn(T, H, generator=g)
    indices = torch.rand(T, E, generator=g).topk(TOP_K, dim=-1).indices
    weights = torch.rand(T, TOP_K, generator=g) + 0.1
    dispatcher = LocalDispatcher(E)
    rows, row_weights, plan = dispatcher.dispatch(x, indices, weights)
    got = dispatcher.combine(experts(rows, row_weights, plan), plan)

    ref = torch.zeros_like(x)  # the definition, one expert at a time, the adapter applied to the input
    for e in range(E):
        token, slot = torch.where(indices == e)
        xe = x[token]
        h = F.linear(xe, experts.gate_up_proj[e]) + 1.5 * xe @ lora.gate_up_A[e].T @ lora.gate_up_B[e].T
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
        y = F.linear(a, experts.down_proj[e]) + 1.5 * a @ lora.down_A[e].T @ lora.down_B[e].T
        ref = ref.index_add(0, token, y * weights[token, slot].unsqueeze(-1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(T, H, generator=g)
    factors = list(lora.parameters())
    for p, a, b in zip(factors, torch.autograd.grad(got, factors, upstream), torch.autograd.grad(ref, factors, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    """A tiny base model folder with a tokenizer, and an SFT file of sums."""
    from seekmoe.posttrain.demo import make_base_model

    folder = tmp_path_factory.mktemp("lora_sft")
    records = [{"prompt": f"What is {a}+{b}?", "completion": str(a + b)} for a in range(6) for b in range(6)] * 3
    make_base_model(folder / "base", [r["prompt"] + " " + r["completion"] for r in records])
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _sft(folder, out, *flags) -> list[str]:
    return ["sft", "--model", str(folder / "base"), "--data", str(folder / "train.jsonl"), "--out", str(out),
            "--no-progress", *flags, "lr=1e-2", "seq_len=64", "batch_size=4", "warmup_steps=1", "num_threads=1",
            "precision=fp32", "eval_every=1000"]


@pytest.mark.parametrize("flags, message", [
    (["--lora", "0"], "--lora 0 is invalid: expected a rank >= 1"),
    (["--lora", "9999"], "--lora 9999 is above the width of"),
    (["--lora", "4", "--lora-targets", "attention,mlp"], "unknown target 'mlp'"),
    (["--lora", "4", "--lora-dropout", "0.1"], "--lora-dropout 0.1 needs --lora-targets attention"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora RANK"),
    (["--lora", "4", "lora.rnk=3"], "lora.rnk is not a LoRA setting"),
])
def test_bad_lora_options_exit_2_before_anything_is_written(sft_base, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(_sft(sft_base, out, "--max-steps", "2", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sft_with_lora_learns_and_writes_adapter_and_final(sft_base, tmp_path):
    before = _folder_digest(sft_base / "base")
    out = tmp_path / "run"
    assert main(_sft(sft_base, out, "--max-steps", "8", "--lora", "4")) == 0
    losses = [json.loads(line)["lm_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3
    assert _folder_digest(sft_base / "base") == before
    # final/ is the base with the adapter merged in; routers keep their weights, their biases moved.
    final = seekmoe.from_pretrained(out / "final").eval()
    applied = seekmoe.from_pretrained(sft_base / "base").eval()
    attach_adapter(applied, out / "adapter")
    ids = torch.randint(0, final.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert rel_error(final(ids).logits, applied(ids).logits) < 1e-5
    base = seekmoe.from_pretrained(sft_base / "base").state_dict()
    merged = final.state_dict()
    gate = next(k for k in merged if k.endswith("mlp.gate.weight") and k.startswith("model.layers."))
    assert torch.equal(merged[gate], base[gate])
    assert not torch.equal(merged[gate.replace("weight", "e_score_correction_bias")],
                           base[gate.replace("weight", "e_score_correction_bias")])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # The run's last checkpoint exports to the same folder (the adapted modules rebuilt from its train_config).
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "exported")]) == 0
    exported = seekmoe.from_pretrained(tmp_path / "exported").state_dict()
    assert exported.keys() == merged.keys() and all(torch.equal(exported[k], merged[k]) for k in merged)


def test_qlora_trains_on_nf4_base_weights_and_merges_into_the_full_precision_base(sft_base, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "run"
    assert main(_sft(sft_base, out, "--max-steps", "6", "--lora", "4", "--quantize", "nf4")) == 0
    losses = [json.loads(line)["lm_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    final = seekmoe.from_pretrained(out / "final").eval()
    merged = seekmoe.from_pretrained(sft_base / "base").eval()
    attach_adapter(merged, out / "adapter")
    ids = torch.randint(0, final.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert rel_error(final(ids).logits, merged(ids).logits) < 1e-5


def test_nf4_without_torchao_is_one_clear_line(sft_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torchao.quantization", None)
    out = tmp_path / "run"
    assert main(_sft(sft_base, out, "--max-steps", "2", "--lora", "4", "--quantize", "nf4")) == 2
    assert "--quantize nf4 needs torchao" in capsys.readouterr().err
    assert not out.exists()


def test_lora_under_expert_parallelism_and_fsdp_reproduces_one_process(corpus, cache, tmp_path):
    """Two processes, experts split two ways (ExpertShards first, the adapters on each rank's slice) and FSDP2 over
    the rest: the losses and the adapter equal one process's."""
    from safetensors.torch import load_file
    from test_distributed import WORKER, assert_same_losses, losses, one_process, settings, torchrun

    one_process(tmp_path / "pre", corpus, cache, overrides=settings(cache, 4, max_steps=2, save_every=2))
    run = {**settings(cache, 4, max_steps=3, save_every=3, eval_every=100), "init_from": str(tmp_path / "pre" / "final"),
           "lora": {"rank": 2, "targets": EVERY_TARGET}}
    one_process(tmp_path / "one", corpus, cache, overrides=run)
    torchrun(2, WORKER, "train", str(tmp_path / "ep2"), str(corpus),
             json.dumps({**run, "batch_size": 2, "parallel": {"ep": 2}}))
    assert_same_losses(losses(tmp_path / "ep2"), losses(tmp_path / "one"))
    want = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ep2" / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and any(".mlp.experts.base_layer.lora_B" in k for k in want)
    for key in want:
        assert rel_error(got[key], want[key]) < 1e-4 or torch.equal(got[key], want[key]), key


def test_qlora_reads_the_base_block_by_block_into_what_quantizing_the_loaded_model_gives(sft_base):
    pytest.importorskip("torchao")
    from seekmoe.lora.load import load_quantized
    from seekmoe.lora.nf4 import dequantize

    config = LoRAConfig(rank=2, targets=EVERY_TARGET, quantize="nf4")
    torch.manual_seed(3)
    whole = seekmoe.from_pretrained(sft_base / "base")
    apply_lora(whole, config)
    torch.manual_seed(3)
    blockwise, adapted = load_quantized(sft_base / "base", whole.config, config, torch.device("cpu"))
    a, b = whole.state_dict(), blockwise.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(dequantize(a[key]), dequantize(b[key])), key
    trained = {n for n, p in blockwise.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in whole.named_parameters() if p.requires_grad} and adapted.experts


@pytest.mark.parametrize("fields", [dict(use_mla=False, attention_bias=True), dict(q_lora_rank=None)],
                         ids=["multi-head attention with biases", "mla without query compression"])
def test_a_saved_adapted_model_computes_what_the_adapted_model_computes(fields, tmp_path):
    """final/ (the adapters folded into the plain layout) for each attention kind's projections."""
    torch.manual_seed(0)
    model = seekmoe.build_model(seekmoe.ModelConfig.preset("tiny", num_nextn_predict_layers=0, **fields)).eval()
    adapted = apply_lora(model, LoRAConfig(rank=2, targets=EVERY_TARGET))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "final")
    save_adapter(tmp_path / "adapter", lora_parameters(model), LoRAConfig(rank=2, targets=EVERY_TARGET),
                 model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert rel_error(seekmoe.from_pretrained(tmp_path / "final")(ids).logits, model(ids).logits) < 1e-5
    leaves = {n.rsplit(".", 1)[-1] for n in adapted.linears if ".self_attn." in n}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == leaves
