"""DeepSeek-V4's MTP module (model/v4_mtp.py) as DeepSeek's release ships it (`mtp.{j}.*`). transformers does not
build it (it ignores `mtp.*` on load), so the oracle is a float64 reference written here from the release's layout:
embedding and streams normed and projected (enorm/e_proj, hnorm/h_proj), one V4 block -- transformers' own
DeepseekV4DecoderLayer, in float64 -- then the module's own stream collapse (hc_head_*), norm and the shared head.
Also: a release-layout folder loads, saves and reloads equal (and transformers still loads the saved folder with the
same logits), a wrong-shaped MTP key is named, training lowers the MTP loss, and speculative decoding with the
module keeps plain greedy's tokens."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import seekmoe
from hf_oracle import rel_error
from seekmoe import ModelConfig, from_pretrained
from seekmoe.inference import Engine, SamplingParams

H, N_HC, L, VOCAB, EPS = 32, 2, 2, 80, 1e-6
# The decoder's two layers, then the MTP block as the release's config marks it (compress ratio 0: window only).
LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "sliding_attention"]
MTP_OWN = {"enorm.weight": (H,), "hnorm.weight": (H,), "e_proj.weight": (H, H), "h_proj.weight": (H, H),
           "norm.weight": (H,), "hc_head_fn": (N_HC, N_HC * H), "hc_head_base": (N_HC,), "hc_head_scale": (1,)}


def rms(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    return y if weight is None else y * weight


def collapse(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The release's hc_head: streams [B, S, n, H] weighted by sigmoid(scale * fn(rms(flat)) + base) + hc_eps."""
    pre = torch.sigmoid(F.linear(rms(streams.flatten(2)), fn) * scale + base) + EPS
    return (pre.unsqueeze(-1) * streams).sum(2)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A folder in DeepSeek-V4's release layout with one MTP module, and a float64 reference of it: transformers'
    V4 with the MTP block as an extra (third) layer, whose weights the folder holds under `mtp.0.`."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=H, moe_intermediate_size=16, num_hidden_layers=L + 1, num_attention_heads=4,
        head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=6, n_shared_experts=1,
        layer_types=LAYER_TYPES, mlp_layer_types=["hash_moe", "moe", "moe"], sliding_window=8, o_groups=2,
        o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=3, partial_rotary_factor=0.5, hc_mult=N_HC,
        hc_sinkhorn_iters=6, swiglu_limit=0.8, max_position_embeddings=256, rms_norm_eps=EPS, hc_eps=EPS,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(6)[:2] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    root = tmp_path_factory.mktemp("v4mtp")
    hf.save_pretrained(root / "hf")
    tensors = {}
    with safe_open(str(root / "hf" / "model.safetensors"), "pt") as f:
        for key in f.keys():  # the release's spelling: no `model.`, embed, hc_head_*, the last layer as mtp.0
            name = key.removeprefix("model.")
            name = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
                    "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}.get(name, name)
            if name.startswith(f"layers.{L}."):
                name = "mtp.0." + name.removeprefix(f"layers.{L}.").replace("attn.norm.", "attn.kv_norm.")
            tensors[name] = f.get_tensor(key)
    gen = torch.Generator().manual_seed(1)
    for name, shape in MTP_OWN.items():
        base = 1.0 if name.endswith("norm.weight") or name == "hc_head_scale" else 0.0
        tensors[f"mtp.0.{name}"] = base + torch.randn(shape, generator=gen) * (0.3 if "proj" in name else 0.1)
    raw = json.loads((root / "hf" / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "num_hidden_layers"):
        raw.pop(key)
    # as the release writes it: one compress ratio a layer, the MTP module's last (0: sliding window only)
    raw.update(num_hidden_layers=L, compress_ratios=[0, 4, 0], num_hash_layers=1, num_nextn_predict_layers=1)
    (root / "rel").mkdir()
    save_file(tensors, str(root / "rel" / "model.safetensors"))
    (root / "rel" / "config.json").write_text(json.dumps(raw))
    hf = hf.double()
    hf.set_experts_implementation("eager")  # its grouped matmul takes no float64
    return root / "rel", hf, {k: v.double() for k, v in tensors.items() if k.startswith("mtp.0.")}


def reference(hf, mtp: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, MTP logits) in float64: at position i the MTP block takes the main model's streams there and
    the embedding of t_{i+1} (the last position's token ahead is a stand-in; causal attention keeps it out of the
    others). transformers' layer L runs as the MTP block: its input is replaced by the MTP module's combination."""
    block, seen = hf.model.layers[L], {}
    ahead = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)

    def enter(module, args, kwargs):
        streams = args[0]
        seen["main"] = streams
        e = rms(hf.model.embed_tokens(ahead), mtp["mtp.0.enorm.weight"])
        x = F.linear(rms(streams, mtp["mtp.0.hnorm.weight"]), mtp["mtp.0.h_proj.weight"])
        return (x + F.linear(e, mtp["mtp.0.e_proj.weight"]).unsqueeze(2),), kwargs

    hooks = [block.register_forward_pre_hook(enter, with_kwargs=True),
             block.register_forward_hook(lambda module, args, out: seen.update(mtp=out))]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        main = hf.lm_head(hf.model.norm(hf.model.hc_head(seen["main"])))
        top = collapse(seen["mtp"], mtp["mtp.0.hc_head_fn"], mtp["mtp.0.hc_head_base"], mtp["mtp.0.hc_head_scale"])
        return main, hf.lm_head(rms(top, mtp["mtp.0.norm.weight"]))


def mtp_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Our MTP module's logits at positions 0..S-2 (fed t_1..t_{S-1}), as training and drafting compute them."""
    S = ids.shape[1]
    cos, sin = model.model.rotary_emb(torch.arange(S - 1))
    h, _ = model.mtp_forward(1, model(ids).hidden_states[:, :-1], ids[:, 1:], cos, sin)
    return model.mtp_logits(1, h)


def test_the_release_mtp_module_equals_a_float64_reference(release):
    path, hf, mtp = release
    ours = from_pretrained(path, dtype=torch.float64)
    assert ours.config.layer_types == LAYER_TYPES[:L] and len(ours.model.mtp) == 1
    attn = ours.model.mtp[0].self_attn
    assert attn.layer_type == "sliding_attention" and attn.compressor is None
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(2))  # 2.5 windows, 5 CSA windows
    want_main, want_mtp = reference(hf, mtp, ids)
    with torch.no_grad():
        assert rel_error(ours(ids).logits, want_main) < 1e-5  # the hyper-connections run in fp32 (as transformers')
        got = mtp_logits(ours, ids)
        assert rel_error(got, want_mtp[:, :-1]) < 1e-5
        # the training loss is the cross-entropy of those predictions against the tokens two ahead
        loss = ours(ids, labels=ids, mtp=True).mtp_loss
        want = F.cross_entropy(want_mtp[:, :-2].flatten(0, 1), ids[:, 2:].flatten())
        assert abs(loss.item() - want.item()) < 1e-5 * want.item()


def test_release_keys_load_save_and_reload_equal_and_transformers_reads_the_saved_folder(release, tmp_path):
    from safetensors import safe_open
    from transformers import DeepseekV4ForCausalLM

    path, _, mtp = release
    ours = from_pretrained(path)
    ours.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {k for k in saved if k.startswith("mtp.")} == set(mtp)  # the release's names, no repeated embed/head
    back = from_pretrained(tmp_path / "saved")
    state, again = ours.state_dict(), back.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "saved").eval()  # it skips mtp.*
    ids = torch.randint(0, VOCAB, (1, 19))
    with torch.no_grad():
        assert rel_error(hf(ids).logits, ours(ids).logits) < 2e-4
        assert torch.equal(mtp_logits(back, ids), mtp_logits(ours, ids))


def test_a_wrong_shaped_mtp_tensor_is_named(release, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _, _ = release
    shutil.copytree(path, tmp_path / "bad")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["mtp.0.h_proj.weight"] = torch.zeros(H, H + 1)
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"mtp\.0\.h_proj\.weight has shape \(32, 33\), the model expects \(32, 32\)"):
        from_pretrained(tmp_path / "bad")
    del tensors["mtp.0.h_proj.weight"]  # a module with one tensor missing: not a model without MTP
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensors the config requires: model\.mtp\.0\.h_proj\.weight"):
        from_pretrained(tmp_path / "bad")


def test_seekmoe_train_lowers_the_mtp_loss_of_tiny_v4(tmp_path, monkeypatch):
    from seekmoe.cli import main
    from seekmoe.train import trainer

    monkeypatch.setattr(trainer, "plot_run", lambda out: [])  # matplotlib's import would be most of the time

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"{i}.txt").write_text("the cat sat on the mat and the dog sat on the log. " * 40)
    args = ["train", "--preset", "tiny-v4", "--out", str(tmp_path / "run"), "--data", str(data), "--max-steps", "6",
            "--no-progress", "seq_len=32", "batch_size=2", "warmup_steps=1", "lr=1e-2", "eval_every=6",
            "save_every=6", "eval_batches=1", f"cache_dir={tmp_path / 'cache'}", "precision=fp32"]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mtp = [m["mtp_loss"] for m in metrics if "mtp_loss" in m]
    assert len(mtp) == 6 and mtp[-1] < mtp[0] - 0.5
    assert len(from_pretrained(tmp_path / "run" / "final").model.mtp) == 1


def test_speculative_decoding_with_v4_mtp_keeps_greedy_tokens_and_drafts_what_the_module_predicts(monkeypatch):
    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset("tiny-v4", num_nextn_predict_layers=2)).eval()
    prompts = [[0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [0, 40], [0, 3, 3, 3, 3, 3, 3, 3]]
    params = SamplingParams(max_new_tokens=12, temperature=0)  # past the window (16) and several compressed ones
    plain = [r.output_ids for r in Engine(model, max_batch_size=3).generate(prompts, params)]
    fused = Engine(model, max_batch_size=3, speculative="mtp").generate(prompts, params)
    assert [r.output_ids for r in fused] == plain and all(r.drafted > 0 for r in fused)

    engine = Engine(model, max_batch_size=3, speculative="mtp")
    engine.drafter.fused = False  # each step's drafts checked against the modules over the whole sequence
    real_draft, checked = engine._draft, []

    def checking(hidden, rows, **kwargs):
        real_draft(hidden, rows, **kwargs)
        for _, r, _ in rows:
            if not r.done and r.prefilled >= len(r.prompt_ids):
                assert r._drafts == whole_sequence_drafts(model, r.prompt_ids + r.output_ids, r._drafts)
                checked.append(r)

    monkeypatch.setattr(engine, "_draft", checking)
    assert [r.output_ids for r in engine.generate(prompts, params)] == plain and len(checked) > 10


def whole_sequence_drafts(model, tokens: list[int], drafts: list[int]) -> list[int]:
    """Module k's greedy draft at the last position P from the whole sequence without a cache, fed t_{j+k} (the
    drafts standing in past the known tokens)."""
    P = len(tokens) - 2
    with torch.no_grad():
        h = model(torch.tensor([tokens])).hidden_states[:, : P + 1]
        cos, sin = model.model.rotary_emb(torch.arange(P + 1))
        known, out = tokens + drafts, []
        for k in range(1, len(drafts) + 1):
            h, _ = model.mtp_forward(k, h, torch.tensor([known[k: k + P + 1]]), cos, sin)
            out.append(int(model.mtp_logits(k, h[0, -1]).argmax()))
    return out


def test_v4_flash_as_released_counts_the_elements_of_its_published_files():
    """DeepSeek-V4-Flash's config.json (its compress_ratios end with the MTP module's 0) built on the meta device and
    written as the release stores it -- routed experts MXFP4 (two values a byte, an E8M0 scale per 32), the FP8
    linears with a scale per 128x128 block, the rest as is -- holds exactly the 158,069,433,298 elements of the
    release's 46 safetensors files (as listed from them), MTP module and hash tables included."""
    from seekmoe.checkpoint import disk_items
    from seekmoe.checkpoint_v4 import v4_disk_key
    from seekmoe.model import CausalLM

    config = ModelConfig.from_dict(dict(
        model_type="deepseek_v4", compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0], num_hash_layers=3,
        compress_rope_theta=160000, rope_scaling=dict(type="yarn", factor=16, beta_fast=32, beta_slow=1,
                                                      original_max_position_embeddings=65536)))
    with torch.device("meta"):
        model = CausalLM(config)
    fp8 = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "attn.indexer.wq_b.",
           "shared_experts.", "e_proj.", "h_proj.")
    stored = mtp = 0
    for name, t in disk_items(dict(model.state_dict()), config):
        key, n = v4_disk_key(name), t.numel()
        if ".ffn.experts." in key:
            n = n // 2 + n // 32
        elif any(part in key for part in fp8):
            n += -(-t.shape[0] // 128) * -(-t.shape[1] // 128)
        stored += n
        mtp += n if key.startswith("mtp.0.") else 0
    assert stored == 158_069_433_298 and mtp > 0
    assert round(sum(p.numel() for p in model.model.mtp.parameters()) / 1e9, 2) == 6.61  # 290.9B with the MTP
