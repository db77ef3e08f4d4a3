"""Model arithmetic: parameter counts (on the meta device), forward FLOPs per token, KV-cache bytes per token."""

from __future__ import annotations

import torch

from ..config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def model_summary(config: ModelConfig, context: int = 4096, cache_dtype: str = "bfloat16") -> dict:
    """Sizes of the model `config` describes, counted on a meta-device build (no memory allocated).

    - total_params / active_params: all weights / those one token uses (its top-k routed experts only), main model
      without the MTP modules, which are reported separately as mtp_params (without the shared embedding and head);
    - flops_per_token: forward FLOPs of the matrix products (2 per multiply-add) of the activated weights other
      than the embedding lookup, plus attention scores and values averaged over a causal window of `context`;
    - kv_cache_bytes_per_token: what a decoder caches per token: MLA's (kv_lora_rank + qk_rope_head_dim) per layer
      (mla_cache_bytes_per_token), plus, with V3.2's sparse attention, the indexer's key of index_head_dim per layer
      (indexer_cache_bytes_per_token), against the full keys and values a standard multi-head attention with the
      same heads would cache. With sparse attention a query attends to at most index_topk keys, and the indexer
      scores all of them. With `use_mla: false` (`attention`: "mha") the cache is the multi-head one, every head's
      key and value, 2 x heads x head_dim per layer.
    """
    from ..model import CausalLM

    with torch.device("meta"):
        model = CausalLM(config)
    total = mtp = routed = 0
    for name, p in model.named_parameters():
        if name.startswith("model.mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".mlp.experts." in name:
            routed += p.numel()
    active = total - routed + routed * config.num_experts_per_tok // max(config.n_routed_experts, 1)
    embedding = config.vocab_size * config.hidden_size
    L, heads = config.num_hidden_layers, config.num_attention_heads
    attended = (context + 1) / 2  # mean number of keys a query sees in a causal window
    indexer_flops = 0.0
    if config.index_topk is not None:
        # V3.2: the indexer scores every key it may see (each head a dot product, then the weighted sum); MLA
        # attends to the top-k of them only
        indexer_flops = 2 * L * config.index_n_heads * (config.index_head_dim + 1) * attended
        attended = _mean_attended(context, config.index_topk)
    attention_flops = 2 * L * heads * (config.qk_head_dim + config.v_head_dim) * attended + indexer_flops
    if config.is_v4:
        attention_flops = v4_attention_flops(config, context)
    per_dtype = DTYPE_BYTES[cache_dtype]
    mla_values = (config.kv_lora_rank + config.qk_rope_head_dim) * L
    indexer_values = 0 if config.index_topk is None else config.index_head_dim * L  # one indexer key per layer
    mha_values = heads * (config.qk_head_dim + config.v_head_dim) * L
    summary = {
        "total_params": total,
        "active_params": active,
        "mtp_params": mtp,
        "embedding_params": embedding,
        "flops_per_token": int(2 * (active - embedding) + attention_flops),
        "context_for_flops": context,
        "kv_cache_dtype": cache_dtype,
        "kv_cache_bytes_per_token": (mla_values + indexer_values) * per_dtype,
        "mla_cache_bytes_per_token": mla_values * per_dtype,
        "indexer_cache_bytes_per_token": indexer_values * per_dtype,
        "mha_kv_cache_bytes_per_token": mha_values * per_dtype,
        "num_hidden_layers": L,
        "moe_layers": config.n_moe_layers,
        "n_routed_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
    }
    if not config.use_mla:  # multi-head attention caches every head's key and value: it is "the MHA" itself
        mha_bytes = 2 * heads * config.mha_head_dim * L * per_dtype
        summary.update(attention="mha", kv_cache_bytes_per_token=mha_bytes, mla_cache_bytes_per_token=0,
                       mha_kv_cache_bytes_per_token=mha_bytes,
                       flops_per_token=int(2 * (active - embedding) + 4 * L * heads * config.mha_head_dim * attended))
    if config.is_v4:  # no latent: its window, compressed keys and indexer keys, against V3's MLA
        at = {n: v4_cache_bytes(config, n, per_dtype) / n for n in V4_CONTEXTS}
        summary.update(kv_cache_bytes_per_token=round(at[V4_CONTEXTS[0]]), indexer_cache_bytes_per_token=0,
                       v4_cache_bytes_per_token={str(n): round(b) for n, b in at.items()},
                       mla_v3_kv_cache_bytes_per_token=(512 + 64) * 61 * per_dtype,
                       mha_kv_cache_bytes_per_token=heads * 2 * config.head_dim * L * per_dtype)
    return summary


def v4_attention_flops(config: ModelConfig, context: int) -> float:
    """DeepSeek-V4's attention FLOPs per token averaged over a causal context: each head scores and mixes (keys are
    values: 2 x head_dim a key) the window's keys and the compressed ones it sees (every complete window for HCA, at
    most index_topk for CSA); CSA's indexer scores every complete window with its own heads."""
    W, D = config.sliding_window, config.head_dim
    keys = index = 0.0
    for kind in config.layer_types:
        keys += min(W, (context + 1) / 2)
        if kind != "sliding_attention":
            windows = context / config.compress_rates[kind] / 2  # complete windows, on average over the context
            keys += windows if kind == "heavily_compressed_attention" else min(config.index_topk, windows)
            if kind == "compressed_sparse_attention":
                index += windows * config.index_n_heads * config.index_head_dim
    return 2 * config.num_attention_heads * 2 * D * keys + 2 * index


V4_CONTEXTS = (128 * 1024, 1024 * 1024)  # the contexts `seekmoe info` gives DeepSeek-V4's cache at


def v4_cache_bytes(config: ModelConfig, context: int, dtype_bytes: int) -> int:
    """Bytes of a DeepSeek-V4 decoding cache (model/v4_cache.py) after `context` tokens: per layer the last
    sliding_window - 1 keys, and per compressor (the layer's; CSA's indexer too) one key per `rate` tokens, the open
    window's kv and gate projections and, for CSA's overlapping windows, the previous window's first series."""
    D, Di, W = config.head_dim, config.index_head_dim, config.sliding_window
    total = 0
    for kind in config.layer_types:
        total += min(context, W - 1) * D
        if kind == "sliding_attention":
            continue
        m = config.compress_rates[kind]
        open_tokens = min(context % m, m - 1)
        if kind == "heavily_compressed_attention":
            total += context // m * D + open_tokens * 2 * D
        else:
            for width in (D, Di):
                total += context // m * width + open_tokens * 2 * 2 * width + (m * 2 * width if context >= m else 0)
    return total * dtype_bytes


def _mean_attended(context: int, top_k: int) -> float:
    """The mean over a causal window of `context` queries of the keys each attends to, at most top_k."""
    if context <= top_k:
        return (context + 1) / 2
    return (top_k * (top_k + 1) / 2 + (context - top_k) * top_k) / context


def parameter_count(config: ModelConfig) -> int:
    """Every parameter of the model `config` describes, MTP modules included (the tied LM head once), counted from
    one block of each kind built on the meta device: a config of a thousand layers costs no more than one of two,
    so a hostile config.json is sized before anything is built."""
    from ..model.block import DecoderBlock
    from ..model.mtp import MTPModule

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    n_moe = config.n_moe_layers
    total = V * H * (1 if config.tie_word_embeddings else 2) + H  # embedding, LM head, final norm
    if config.is_v4:
        return total + _v4_blocks_count(config)
    with torch.device("meta"):
        if n_moe:
            total += n_moe * count(DecoderBlock(config, moe=True))
        if L - n_moe:
            total += (L - n_moe) * count(DecoderBlock(config, moe=False))
        if config.num_nextn_predict_layers:
            total += config.num_nextn_predict_layers * count(MTPModule(config))
    return total


def _v4_blocks_count(config: ModelConfig) -> int:
    """The parameters of a DeepSeek-V4 model's blocks, final stream collapse and MTP modules, one block built per
    distinct (attention type, MoE type) pair and one MTP module."""
    from ..model.hyper_connections import HyperHead
    from ..model.v4_block import V4DecoderBlock
    from ..model.v4_mtp import V4MTPModule
    from ..model.v4_rope import V4RotaryEmbedding

    kinds: dict[tuple[str, str], int] = {}
    for i, kind in enumerate(zip(config.layer_types, config.mlp_layer_types)):
        kinds.setdefault(kind, i)
    with torch.device("meta"):
        rotary = V4RotaryEmbedding(config)
        per_kind = {kind: sum(p.numel() for p in V4DecoderBlock(config, i, rotary).parameters())
                    for kind, i in kinds.items()}
        head = sum(p.numel() for p in HyperHead(config.hidden_size, config.hc_mult, 0.0, 1.0).parameters())
        D = config.num_nextn_predict_layers
        mtp = D and D * sum(p.numel() for p in V4MTPModule(config, 1, rotary).parameters())
    return head + mtp + sum(per_kind[kind] for kind in zip(config.layer_types, config.mlp_layer_types))


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_summary(name: str, s: dict) -> str:
    """A human-readable table of `model_summary`'s figures."""
    ratio = s["mha_kv_cache_bytes_per_token"] / s["kv_cache_bytes_per_token"]
    indexer = s.get("indexer_cache_bytes_per_token", 0)
    rows = [
        ("model", name),
        ("total parameters", f"{_human(s['total_params'])} ({s['total_params']:,})"),
        ("activated per token", f"{_human(s['active_params'])} ({s['active_params']:,})"),
        ("MTP modules (extra)", f"{_human(s['mtp_params'])} ({s['mtp_params']:,})"),
        ("layers (MoE)", f"{s['num_hidden_layers']} ({s['moe_layers']})"),
        ("routed experts", f"{s['n_routed_experts']}, {s['num_experts_per_tok']} active per token"),
        ("forward FLOPs per token", f"{_human(s['flops_per_token'], 'FLOP')} at context {s['context_for_flops']}"),
        (f"KV cache per token, MLA ({s['kv_cache_dtype']})", f"{s['mla_cache_bytes_per_token']:,} bytes"),
    ]
    if s.get("attention") == "mha":  # no latent cache: one row, keys and values of every head
        rows[-1:] = [(f"KV cache per token, multi-head attention ({s['kv_cache_dtype']})",
                      f"{s['kv_cache_bytes_per_token']:,} bytes (keys and values of every head)")]
    elif "v4_cache_bytes_per_token" in s:  # DeepSeek-V4: its own caches at long contexts, V3's MLA beside them
        mla = s["mla_v3_kv_cache_bytes_per_token"]
        rows[-1:] = [(f"V4 cache per token at {int(n) // 1024}K ({s['kv_cache_dtype']})",
                      f"{b:,} bytes ({mla / b:.1f}x less than DeepSeek-V3's MLA, {mla:,})")
                     for n, b in s["v4_cache_bytes_per_token"].items()]
        rows.append((f"KV cache per token, MHA ({s['kv_cache_dtype']})",
                     f"{s['mha_kv_cache_bytes_per_token']:,} bytes"))
    else:
        if indexer:
            rows += [(f"indexer keys per token ({s['kv_cache_dtype']})", f"{indexer:,} bytes"),
                     ("cache per token in all", f"{s['kv_cache_bytes_per_token']:,} bytes")]
        rows.append((f"KV cache per token, MHA ({s['kv_cache_dtype']})",
                     f"{s['mha_kv_cache_bytes_per_token']:,} bytes ({ratio:.1f}x {'MLA' if not indexer else 'this'})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
