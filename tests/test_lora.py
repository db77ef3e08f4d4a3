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


def _experts_with_lora(E, H, I, R, backend, dtype, g, limit=None, scaling=1.5):
    """A frozen RoutedExperts of random weights with a LoRAExperts provider of random factors (B nonzero)."""
    experts = RoutedExperts(E, H, I, backend=backend, swiglu_limit=limit).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g, dtype=dtype) / H**0.5)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=g, dtype=dtype) / I**0.5)
    experts.requires_grad_(False)
    lora = LoRAExperts(E, H, I, R, scaling=scaling).to(dtype)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    experts.add_provider("lora", lora)
    return experts, lora


def _routed(E, T, H, top_k, dtype, g):
    x = torch.randn(T, H, generator=g, dtype=dtype, requires_grad=True)
    indices = torch.rand(T, E, generator=g).topk(top_k, dim=-1).indices
    # fp32 values: the experts keep routing weights in fp32 (and give their gradient in fp32)
    weights = (torch.rand(T, top_k, generator=g) + 0.1).to(dtype).requires_grad_(True)
    return x, indices, weights


def _moe_output(experts, x, indices, weights):
    dispatcher = LocalDispatcher(experts.n_experts)
    rows, row_weights, plan = dispatcher.dispatch(x, indices, weights)
    return dispatcher.combine(experts(rows, row_weights, plan).to(x.dtype), plan)


def _per_expert_loop(experts, lora, x, indices, weights, limit):
    """The definition in float64, one expert at a time: each projection W x + s B(A x), DeepSeek-V4's clamp."""
    from seekmoe.model.grouped_swiglu import clamp_gate_up

    d = torch.float64
    s = lora.scaling
    ref = torch.zeros(x.shape, dtype=d)
    for e in range(experts.n_experts):
        token, slot = torch.where(indices == e)
        xe = x[token].to(d)
        h = xe @ experts.gate_up_proj[e].to(d).T + s * xe @ lora.gate_up_A[e].to(d).T @ lora.gate_up_B[e].to(d).T
        gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
        a = F.silu(gate) * up
        y = a @ experts.down_proj[e].to(d).T + s * a @ lora.down_A[e].to(d).T @ lora.down_B[e].to(d).T
        ref = ref.index_add(0, token, y * weights[token, slot].to(d).unsqueeze(-1))
    return ref


@pytest.mark.parametrize("limit", [None, 0.7], ids=["swiglu", "clamped swiglu"])
@pytest.mark.parametrize("backend, dtype", [("padded_bmm", torch.float64), ("gathered", torch.float64),
                                            ("grouped_mm", torch.float32)])
def test_unmaterialized_expert_lora_equals_merging_and_a_per_expert_loop(backend, dtype, limit):
    """The adapters on the rank-wide path (never forming W + BA) give the outputs and the gradients (all four factors,
    the input rows, the routing weights) of the merged weights and of the per-expert definition; grouped_mm has no
    float64 and is held to float32 rounding. The rank (3) is padded to grouped_mm's 16-byte strides inside."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{backend}{limit}".encode()))
    experts, lora = _experts_with_lora(E, H, I, R, backend, dtype, g, limit)
    x, indices, weights = _routed(E, T, H, TOP_K, dtype, g)
    if limit is not None:  # some gate/up values beyond the clamp, some inside
        assert 0.05 < (_per_expert_loop(experts, lora, x, indices, weights, None).abs() > limit).double().mean()
    inputs = [*lora.parameters(), x, weights]
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def run(materialize):
        lora.materialize = materialize
        out = _moe_output(experts, x, indices, weights)
        return out, torch.autograd.grad(out, inputs, upstream.to(out.dtype))

    new, new_grads = run(False)
    merged, merged_grads = run(True)
    ref = _per_expert_loop(experts, lora, x, indices, weights, limit)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(new, merged, **tol)
    torch.testing.assert_close(new.double(), ref, **tol)
    for a, b, c in zip(new_grads[:-1], merged_grads[:-1], ref_grads[:-1]):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a.double(), c.double(), **tol)
    fp32 = dict(rtol=2e-5, atol=2e-5)  # the routing weights' gradient is computed in fp32
    torch.testing.assert_close(new_grads[-1], merged_grads[-1], **fp32)
    torch.testing.assert_close(new_grads[-1].double(), ref_grads[-1].double(), **fp32)
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
def test_unmaterialized_expert_lora_with_a_trained_base_gives_its_gradients(backend):
    """Where the base weights train too (no LoRA run does, but the operator allows it), their gradients are those of
    the merged weights (d(W + BA)/dW = 1)."""
    g = torch.Generator().manual_seed(5)
    experts, lora = _experts_with_lora(E, H, I, 4, backend, torch.float32, g)
    experts.requires_grad_(True)
    x, indices, weights = _routed(E, T, H, TOP_K, torch.float32, g)
    stacks = [experts.gate_up_proj, experts.down_proj]
    grads = []
    for materialize in (False, True):
        lora.materialize = materialize
        grads.append(torch.autograd.grad(_moe_output(experts, x, indices, weights).square().sum(), stacks))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


class _PeakBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of the tensors created while it is on and still alive (storages counted once, freed when
    their last tensor goes): CPU memory as the operators see it, no allocator statistics needed."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def _free(self, key, nbytes):
        self.storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.storages:
                    self.storages.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def test_unmaterialized_expert_lora_needs_less_memory_than_merging_on_many_experts():
    """64 experts and a few routed tokens: merging copies every expert's weights (and its gradient) at every step,
    the rank-wide path holds rows x rank. Peak bytes of one forward and backward, counted per created tensor."""
    g = torch.Generator().manual_seed(11)
    n_experts = 64
    experts, lora = _experts_with_lora(n_experts, 64, 32, 4, "grouped_mm", torch.float32, g)
    x, indices, weights = _routed(n_experts, 16, 64, 4, torch.float32, g)
    peaks = {}
    for materialize in (False, True):
        lora.materialize = materialize
        with _PeakBytes() as counter:
            _moe_output(experts, x, indices, weights).square().sum().backward()
        peaks[materialize] = counter.peak
    stacks = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 4
    assert peaks[True] > 2 * stacks  # the merged copy and its gradient
    # The rank-wide path: the factors' copies and gradients (rank 4: 15% of the stacks each) and row-sized tensors.
    assert peaks[False] < stacks / 2 and peaks[False] < peaks[True] / 4, peaks


def test_unmaterialized_expert_lora_on_an_nf4_base_equals_merging_into_it():
    """QLoRA: the dequantized NF4 stacks with the factors beside them give what merging into them gives."""
    pytest.importorskip("torchao")
    from seekmoe.lora.nf4 import NF4Experts

    g = torch.Generator().manual_seed(13)
    experts, lora = _experts_with_lora(E, H, I, R, "grouped_mm", torch.float32, g)
    experts.add_provider("nf4", NF4Experts(experts))
    x, indices, weights = _routed(E, T, H, TOP_K, torch.float32, g)
    outs = []
    for materialize in (False, True):
        lora.materialize = materialize
        out = _moe_output(experts, x, indices, weights)
        outs.append((out, *torch.autograd.grad(out.square().sum(), [*lora.parameters(), x])))
    assert experts.gate_up_proj.shape[0] == 0  # the stacks are NF4's, the experts' own are placeholders
    for a, b in zip(*outs):
        assert rel_error(a, b) < 1e-5  # float32 rounding (NF4 dequantizes to the stacks' float32)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_grouped_swiglu_with_low_rank_factors_passes_torch_opcheck(layout):
    """The operator with factors (rank 3: padded to grouped_mm's strides inside): its fake rule and autograd
    registration agree with its computation, as compiled training needs."""
    from seekmoe.model.grouped_swiglu import grouped_swiglu

    torch.manual_seed(0)
    offsets = torch.tensor([3, 0, 5, 2]).cumsum(0).to(torch.int32)
    rows, weights = torch.randn(10, 16, requires_grad=True), torch.rand(10, requires_grad=True)
    gate_up, down = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    factors = [torch.randn(4, 3, 16), torch.randn(4, 16, 3), torch.randn(4, 3, 8), torch.randn(4, 16, 3)]
    factors = [f.requires_grad_(True) for f in factors]
    torch.library.opcheck(grouped_swiglu, (rows, weights, gate_up, down, offsets, layout, 0.8, *factors, 1.5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


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
    # The MTP module was adapted and trained too: PEFT's file has none of it (transformers' model has no MTP, every
    # key names a decoder layer it has), the file beside it does, and `seekmoe merge` rebuilds final/ with it.
    assert final.config.num_nextn_predict_layers == 1
    from safetensors.torch import load_file

    peft_keys = load_file(str(out / "adapter" / "adapter_model.safetensors")).keys()
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in peft_keys}
    assert layers == set(range(final.config.num_hidden_layers))
    mtp_keys = load_file(str(out / "adapter" / "seekmoe_mtp.safetensors")).keys()
    assert {"model.mtp.0.self_attn.o_proj.lora_B", "model.mtp.0.mlp.experts.providers.lora.down_B"} <= mtp_keys
    mtp_weight = "model.mtp.0.self_attn.o_proj.weight"
    assert rel_error(merged[mtp_weight], base[mtp_weight]) > 1e-4
    assert main(["merge", "--model", str(sft_base / "base"), "--adapter", str(out / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    remerged = seekmoe.from_pretrained(tmp_path / "merged").state_dict()
    assert remerged.keys() == merged.keys()
    for key in merged:
        assert rel_error(remerged[key], merged[key]) < 1e-6 or torch.equal(remerged[key], merged[key]), key
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
