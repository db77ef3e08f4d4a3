"""`seekmoe export --format gguf`: a model folder as one GGUF file for llama.cpp's `deepseek2` architecture (and so
Ollama and LM Studio), written with the `gguf` package.

What llama.cpp's own converter (convert_hf_to_gguf.py) would need two patches for is written here directly:
- the tokenizer: ours is byte-level BPE split by GPT-2's regex (tokenizers' ByteLevel pre-tokenizer), so the
  pre-tokenizer is named `gpt-2` instead of being guessed from a hash of sample encodings (unknown to llama.cpp);
- `deepseek2.attention.q_lora_rank` always, 0 without query compression: llama.cpp reads the key unless the model
  has 26, 27 or 48 layers (its test for "a Lite model") and refuses the file without it.
Layouts follow llama.cpp's deepseek2 loader: routed experts stacked per layer (`ffn_{gate,up,down}_exps`,
[E, out, in] in torch's order), `kv_b_proj` split into `attn_k_b` ([heads, kv_lora_rank, qk_nope], transposed
for the absorbed attention) and `attn_v_b` ([heads, v_head_dim, kv_lora_rank]), RoPE on adjacent pairs (llama.cpp's
"norm" rope), which is how DeepSeek's weights are laid out already.

Left out, and said so on stdout: the MTP modules (llama.cpp's deepseek2 drafts with MTP only for query-compressed
single-module models, and its converter drops them too). Refused with a clear error: the literature routers and
expert capacity (llama.cpp runs DeepSeek's dropless router only). The tensors are streamed from the safetensors one
at a time (experts one layer at a time) through a temporary file, so a model larger than memory exports too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "deepseek2"
_DISK_TO_GGUF = {  # model.layers.N.<key> -> blk.N.<name>
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Kept in F32 whatever the file type, as llama.cpp's converter does: norms, biases and the router (its logits decide
# the routing; a rounding there changes which experts run).
_ALWAYS_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight")


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, its tensor count, and the notes (what was left out or differs)."""

    path: Path
    n_tensors: int
    notes: list[str]


def export_gguf(model_dir: str | Path, out: str | Path, file_type: str = "bf16") -> GGUFExport:
    """Write the model folder `model_dir` (config.json, safetensors, tokenizer.json) as the GGUF file `out`, weights
    in `file_type` (one of GGUF_TYPES; Q8_0 falls back to F16 for rows not a multiple of 32). ValueError naming the
    reason for a model llama.cpp cannot run, before anything is written."""
    import gguf

    from .checkpoint import checkpoint_files, dequantize_fp8
    from .model_folder import config_from_dict, read_config_json

    model_dir, out = Path(model_dir), Path(out)
    if file_type not in GGUF_TYPES:
        raise ValueError(f"--outtype {file_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such directory")
    raw = read_config_json(model_dir / "config.json")
    config = config_from_dict(raw, str(model_dir / "config.json"))
    notes = _check_supported(config)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}: a GGUF file carries its tokenizer")
    vocab = _vocab(tokenizer_file, config.vocab_size)
    files = checkpoint_files(model_dir)
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    handles: dict = {}

    def read(key: str) -> torch.Tensor:
        from safetensors import safe_open

        name = files[key]
        if name not in handles:
            handles[name] = safe_open(str(model_dir / name), "pt")
        t = handles[name].get_tensor(key)
        if t.dtype == torch.float8_e4m3fn:
            if key + "_scale_inv" not in files:
                raise ValueError(f"FP8 tensor {key} has no {key}_scale_inv in the checkpoint")
            t = dequantize_fp8(t, read(key + "_scale_inv"), block)
        return t.float()

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[file_type]
    if config.num_nextn_predict_layers and any(_layer_of(k) is not None and _layer_of(k) >= config.num_hidden_layers
                                               for k in files):
        notes.append(f"left out: the {config.num_nextn_predict_layers} MTP module(s), as llama.cpp's own converter "
                     f"does (decoding is unchanged; only MTP speculative drafting is lost)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH, use_temp_file=True)  # tensors wait in a temporary file, not memory
    try:
        _write_metadata(writer, gguf, config, model_dir.name, file_type)
        _write_vocab(writer, vocab, config)
        n = 0
        for name, tensor in _gguf_tensors(config, files, read):
            data, raw_type = _encode(gguf, name, tensor, qtype)
            writer.add_tensor(name, data, raw_dtype=raw_type)
            n += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out)  # a crash leaves no half-written FILE.gguf that llama.cpp would try to load
    return GGUFExport(out, n, notes)


def _layer_of(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def _check_supported(config) -> list[str]:
    """ValueError for what llama.cpp's deepseek2 cannot run; notes for what it runs differently."""
    if config.router_type != "deepseek":
        raise ValueError(f"router_type {config.router_type!r}: llama.cpp runs DeepSeek's router only, so a model "
                         f"trained with a literature router cannot be exported to GGUF")
    if config.eval_capacity() > 0:
        raise ValueError(f"eval_capacity_factor {config.eval_capacity()}: llama.cpp's MoE is dropless; a model that "
                         f"drops tokens over expert capacity would decode differently there")
    if config.is_v4 or config.index_topk is not None or not config.use_mla:
        kind = ("DeepSeek-V4 attention" if config.is_v4 else "V3.2's sparse attention" if config.index_topk
                is not None else "multi-head attention (use_mla false)")
        raise ValueError(f"model_type {config.model_type!r}: this export writes llama.cpp's deepseek2 (MLA, dense "
                         f"attention); {kind} has another layout there, not written by seekmoe yet")
    if config.n_routed_experts == 0:
        raise ValueError("n_routed_experts 0: a dense model has no deepseek2 layout in llama.cpp (export a MoE model)")
    notes = []
    if config.topk_method == "group_limited_greedy" and 1 < config.topk_group < config.n_group:
        notes.append(f"differs: llama.cpp ranks expert groups by the sum of their top-2 scores (DeepSeek-V3's rule), "
                     f"not by their best score as topk_method group_limited_greedy does: some tokens may route "
                     f"to other experts")
    return notes


def _write_metadata(w, gguf, config, name: str, file_type: str) -> None:
    """The general.* and deepseek2.* keys llama.cpp's loader reads."""
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    # MLA runs in llama.cpp as multi-query attention over the latent: one KV head of kv_lora_rank + rope dims.
    w.add_head_count_kv(1)
    w.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    w.add_value_length(config.kv_lora_rank)
    w.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    w.add_value_length_mla(config.v_head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.qk_rope_head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_leading_dense_block_count(config.first_k_dense_replace)
    w.add_q_lora_rank(config.q_lora_rank or 0)  # always: see the module docstring
    w.add_kv_lora_rank(config.kv_lora_rank)
    w.add_expert_count(config.n_routed_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_shared_count(config.n_shared_experts)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_weights_scale(config.routed_scaling_factor)
    w.add_expert_weights_norm(bool(config.norm_topk_prob))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if config.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if config.topk_method != "greedy" and 1 < config.topk_group < config.n_group:
        w.add_expert_group_count(config.n_group)
        w.add_expert_group_used_count(config.topk_group)
    rope = config.rope_scaling or {}
    if (rope.get("type") or rope.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
        if rope.get("mscale_all_dim") is not None:
            # llama.cpp divides this key by 0.1 for deepseek2 (its converter's historical scaling), so it is stored so.
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


@dataclass
class _Vocab:
    tokens: list[str]
    types: list  # gguf.TokenType
    merges: list[str]
    special: dict[str, int]


def _vocab(file: Path, vocab_size: int) -> _Vocab:
    """The token list, types and merges of a byte-level BPE tokenizer.json split by GPT-2's regex; ValueError
    otherwise (llama.cpp would pre-tokenize such a tokenizer differently)."""
    data = json.loads(file.read_text())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space", False) or data.get("normalizer"):
        found = f"model {model.get('type')}, pre-tokenizer {pre.get('type')}, normalizer " \
                f"{(data.get('normalizer') or {}).get('type')}"
        raise ValueError(f"{file}: {found}; expected seekmoe's byte-level BPE (ByteLevel pre-tokenizer with GPT-2's "
                         f"regex, no prefix space, no normalizer), the one tokenizer this export names for llama.cpp")
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        ids[content] = t["id"]
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"{file} has token id {max(ids.values())}, beyond the model's vocab_size {vocab_size}")
    from gguf import TokenType

    by_id = {i: tok for tok, i in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp wants one entry per embedding row
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tok = by_id[i]
            tokens.append(tok)
            types.append(TokenType.CONTROL if tok in added and added[tok].get("special")
                         else TokenType.USER_DEFINED if tok in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return _Vocab(tokens, types, merges, {t: added[t]["id"] for t in added})


def _write_vocab(w, vocab: _Vocab, config) -> None:
    """The tokenizer.ggml.* keys: llama.cpp's "gpt2" BPE with GPT-2's pre-tokenizer, BOS added to every prompt."""
    from .inference.tokenizer import CHAT_TEMPLATE

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if config.bos_token_id is not None:
        w.add_bos_token_id(config.bos_token_id)
        w.add_add_bos_token(True)  # seekmoe starts every prompt with BOS
    if config.eos_token_id is not None:
        w.add_eos_token_id(config.eos_token_id)
        w.add_pad_token_id(config.eos_token_id)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _gguf_tensors(config, files: dict[str, str], read: Callable[[str], torch.Tensor]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in torch's [out, in] order) for every tensor llama.cpp loads, one layer at a time."""
    L, E = config.num_hidden_layers, config.n_routed_experts
    H, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    for key, name in _TOP_LEVEL.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd
        if key not in files:
            raise ValueError(f"the checkpoint lacks {key}")
        yield name, read(key)
    by_layer: dict[int, list[str]] = {}
    for key in files:
        if key in _TOP_LEVEL or key.endswith("_scale_inv") or key.endswith("rotary_emb.inv_freq"):
            continue
        layer = _layer_of(key)
        if layer is None:
            raise ValueError(f"checkpoint tensor {key} has no place in llama.cpp's deepseek2 layout")
        if layer < L:
            by_layer.setdefault(layer, []).append(key)
    for i in range(L):
        experts: dict[str, dict[int, str]] = {}
        for key in sorted(by_layer.get(i, [])):
            rest = key[len(f"model.layers.{i}."):]
            m = _EXPERT.match(rest)
            if m:
                experts.setdefault(m.group(2), {})[int(m.group(1))] = key
            elif rest == "self_attn.kv_b_proj.weight":
                kv_b = read(key).view(H, nope + v, config.kv_lora_rank)
                yield f"blk.{i}.attn_k_b.weight", kv_b[:, :nope].transpose(1, 2).contiguous()  # [H, kv_lora, nope]
                yield f"blk.{i}.attn_v_b.weight", kv_b[:, nope:].contiguous()  # [H, v, kv_lora]
            elif rest in _DISK_TO_GGUF:
                yield f"blk.{i}.{_DISK_TO_GGUF[rest]}", read(key)
            else:
                raise ValueError(f"checkpoint tensor {key} has no place in llama.cpp's deepseek2 layout")
        for part in ("gate_proj", "up_proj", "down_proj"):
            if part in experts:
                keys = experts[part]
                if sorted(keys) != list(range(E)):
                    raise ValueError(f"layer {i} holds {len(keys)} of its {E} experts' {part} weights")
                yield f"blk.{i}.ffn_{part.removesuffix('_proj')}_exps.weight", torch.stack([read(keys[e])
                                                                                         for e in range(E)])


def _encode(gguf, name: str, tensor: torch.Tensor, qtype) -> tuple[np.ndarray, object]:
    """The tensor's bytes for the file and their GGML type (None: numpy's dtype says it)."""
    T = gguf.GGMLQuantizationType
    if tensor.dim() <= 1 or name.endswith(_ALWAYS_F32) or qtype == T.F32:
        return tensor.float().numpy(), None
    if qtype == T.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] != 0:
        qtype = T.F16  # llama.cpp's converter falls back the same way for rows Q8_0 blocks do not divide
    if qtype == T.F16:
        return tensor.half().numpy(), None
    if qtype == T.BF16:
        # Round to nearest even in torch (gguf's numpy path does the same, slower); bytes as uint8 [.., 2 * cols].
        bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return bits, T.BF16
    return gguf.quants.quantize(tensor.float().numpy(), qtype), qtype
