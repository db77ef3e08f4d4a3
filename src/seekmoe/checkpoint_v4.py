"""DeepSeek-V4's tensor names on disk <-> seekmoe's (which are transformers' module names).

transformers saves a V4 model under DeepSeek's release names inside each layer (`attn.wq_a`, `ffn.experts.{e}.w1`,
`hc_attn_fn`, ...) but keeps `model.` in front and its own names at the top (`model.embed_tokens`, `model.hc_head.hc_fn`,
`model.norm`) except the head (`head.weight`). DeepSeek's release has no `model.` prefix and spells the top level
`embed`, `head`, `norm`, `hc_head_fn`, with the MTP modules under `mtp.{j}.` (model/v4_mtp.py). Both load, and so
do transformers' module names; `v4_disk_key` writes what transformers writes, and the MTP modules, which transformers
does not build (it ignores `mtp.*` keys on load), under the release's `mtp.{j}.` names.
"""

from __future__ import annotations

import re

# Inside a layer: (our name, the release's), applied in order (the more specific first).
_LAYER_NAMES = (
    ("self_attn.compressor.indexer.scorer.weights_proj.", "attn.indexer.weights_proj."),
    ("self_attn.compressor.indexer.q_b_proj.", "attn.indexer.wq_b."),
    ("self_attn.compressor.indexer.", "attn.indexer.compressor."),
    ("self_attn.", "attn."),
    ("mlp.shared_experts.gate_proj.", "ffn.shared_experts.w1."),
    ("mlp.shared_experts.down_proj.", "ffn.shared_experts.w2."),
    ("mlp.shared_experts.up_proj.", "ffn.shared_experts.w3."),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.", "ffn."),
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
    ("attn_hc.fn", "hc_attn_fn"), ("attn_hc.base", "hc_attn_base"), ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"), ("ffn_hc.base", "hc_ffn_base"), ("ffn_hc.scale", "hc_ffn_scale"),
)
# The leaf names of attention and its compressors, after the prefixes above.
_LEAF_NAMES = (
    (".sinks", ".attn_sink"), (".q_a_proj.", ".wq_a."), (".q_b_proj.", ".wq_b."), (".q_a_norm.", ".q_norm."),
    (".kv_proj.", ".wkv."), (".gate_proj.", ".wgate."), (".kv_norm.", ".norm."), (".position_bias", ".ape"),
    (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."),
)
_EXPERT_PARTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_TOP_FROM_RELEASE = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
                     "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
                     "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
# An MTP module's own tensors (our name after `model.mtp.{j}.`, the release's after `mtp.{j}.`); its block's are a
# layer's.
_MTP_NAMES = (("shared_head.norm.norm.weight", "norm.weight"), ("shared_head.norm.hc_head.hc_fn", "hc_head_fn"),
              ("shared_head.norm.hc_head.hc_base", "hc_head_base"),
              ("shared_head.norm.hc_head.hc_scale", "hc_head_scale"))
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^(?:model\.)?mtp\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(ffn|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def v4_disk_key(name: str) -> str:
    """The key transformers writes for our tensor `name` (per-expert names already split:
    `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`); an MTP module's (`model.mtp.{j}.`) as the release names it."""
    if name == "lm_head.weight":
        return "head.weight"
    m = _MTP.match(name)
    if m:
        rest = dict(_MTP_NAMES).get(m.group(2)) or _layer_disk_name(m.group(2))
        if rest.startswith("attn.norm."):  # the release's name of the key norm, where transformers writes attn.norm
            rest = "attn.kv_norm." + rest.removeprefix("attn.norm.")
        return f"mtp.{m.group(1)}.{rest}"
    m = _LAYER.match(name)
    if not m:
        return name
    return f"model.layers.{m.group(1)}.{_layer_disk_name(m.group(2))}"


def _layer_disk_name(rest: str) -> str:
    """The release's name of a block's tensor from ours (both after the layer's prefix)."""
    e = _EXPERT.match(rest)
    if e:
        return f"ffn.experts.{e.group(2)}.{_EXPERT_PARTS[e.group(3)]}.weight"
    for ours, disk in _LAYER_NAMES:
        if rest.startswith(ours) or rest == ours:
            rest = disk + rest[len(ours):]
            break
    if rest.startswith("attn."):
        for ours, disk in _LEAF_NAMES:
            rest = rest.replace(ours, disk)
    return rest


def v4_model_key(key: str) -> str:
    """Our tensor name for a disk key in any of the three spellings (the release's MTP modules, `mtp.{j}.`, to
    `model.mtp.{j}.`). Expert keys come out per expert (`...mlp.experts.{e}.gate_proj.weight`), as checkpoint.py
    expects."""
    if key in _TOP_FROM_RELEASE:
        return _TOP_FROM_RELEASE[key]
    m = _MTP.match(key)
    if m:
        rest = {disk: ours for ours, disk in _MTP_NAMES}.get(m.group(2))
        return f"model.mtp.{m.group(1)}.{rest or _layer_model_name(m.group(2))}"
    m = _LAYER.match(key)
    if not m:
        return key
    return f"model.layers.{m.group(1)}.{_layer_model_name(m.group(2))}"


def _layer_model_name(rest: str) -> str:
    """Our name of a block's tensor from any spelling of it (after the layer's prefix)."""
    e = _EXPERT.match(rest)
    if e:
        part = {v: k for k, v in _EXPERT_PARTS.items()}.get(e.group(3), e.group(3))
        return f"mlp.experts.{e.group(2)}.{part}.weight"
    for ours, disk in _LAYER_NAMES:
        if rest.startswith(disk) and not rest.startswith(ours):
            rest = ours + rest[len(disk):]
            break
    if rest.startswith("self_attn."):
        for ours, disk in _LEAF_NAMES:  # no release leaf name is part of one of ours (".norm." of ".kv_norm.")
            rest = rest.replace(disk, ours)
    return rest
