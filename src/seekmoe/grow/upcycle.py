"""Sparse upcycling (`seekmoe upcycle`): a dense model's SwiGLU FFNs become DeepSeekMoE layers that compute, at the
start, what the FFNs computed.

- Granularity 1 (Komatsuzaki et al. 2022, "Sparse Upcycling"): every routed expert is a copy of the layer's FFN.
  With top-k weights normalized to sum to 1 (`norm_topk_prob`), sum_i g_i FFN(x) = FFN(x), whichever experts the
  router picks.
- Granularity G (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"; Megatron-Core's granular
  upcycling): the FFN's intermediate dimension is cut into G slices, FFN(x) = sum_g FFN_g(x) exactly (SwiGLU acts
  elementwise on it), and every copy of the FFN becomes G fine-grained experts of width I/G. Each copy's G slices
  share one router row (the rows are tiled G times), so they score alike and top-k (a multiple of G) takes whole
  copies; their normalized weights then sum to 1/G, which `routed_scaling_factor` = G puts back.
- Shared experts (DeepSeekMoE) are whole copies of the FFN as well (S / G of them in the S * I/G-wide shared MLP).
  The routed and the shared part then each carry half of the FFN: the shared down projection is scaled by
  G / (2S), and routed_scaling_factor is G / 2.

The router rows are random (one per copy), the selection biases zero; the routing is DeepSeek-V3's (sigmoid
scores, `noaux_tc`, one group). Nothing but floating-point rounding separates the upcycled model's outputs from the
dense model's: the weights of the chosen experts sum to 1 within an ulp or two, and the grouped expert GEMMs add in
another order than the FFN's matmul (tests/test_grow.py holds the loss to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import CausalLM
from ..model.mlp import MLP
from ..model.moe import MoE


@dataclass
class UpcycleReport:
    """What `upcycle_model` built, for the command to print."""

    moe_layers: list[str]
    copies: int  # copies of each FFN among the routed experts (n_routed_experts / granularity)
    routed_scaling_factor: float
    shared_scale: float  # factor on the shared experts' down projection (1 when there are none)


def upcycle_config(config: ModelConfig, n_experts: int, top_k: int, n_shared: int = 0, granularity: int = 1,
                   first_k_dense: int = 0) -> ModelConfig:
    """The MoE config that `upcycle_model` builds from the dense `config` (see the module docstring)."""
    L, F, G = config.num_hidden_layers, config.intermediate_size, granularity
    if config.n_routed_experts > 0 and config.first_k_dense_replace < L:
        raise ValueError(f"the model already has MoE layers (n_routed_experts={config.n_routed_experts}, "
                         f"first_k_dense_replace={config.first_k_dense_replace} < num_hidden_layers={L}): upcycle "
                         f"a dense model; add experts to a MoE with `seekmoe expand`")
    if not isinstance(G, int) or G < 1 or F % G:
        raise ValueError(f"--granularity {G!r} is invalid: expected a positive divisor of the dense FFN width "
                         f"intermediate_size={F}")
    if not isinstance(n_experts, int) or n_experts < 1 or n_experts % G:
        raise ValueError(f"--experts {n_experts!r} is invalid: expected a positive multiple of --granularity {G} "
                         f"(each copy of the FFN becomes {G} experts)")
    if not isinstance(top_k, int) or top_k < 1 or top_k % G or top_k > n_experts:
        raise ValueError(f"--top-k {top_k!r} is invalid: expected a multiple of --granularity {G} (whole copies of "
                         f"the FFN) and at most --experts {n_experts}")
    if top_k == 1:
        raise ValueError("--top-k 1 is invalid: DeepSeek's router normalizes the weights of more than one expert only, "
                         "so a single expert would be scaled by its score and the outputs would not start as the "
                         "dense model's; use --top-k 2 or more")
    if not isinstance(n_shared, int) or n_shared < 0 or n_shared % G:
        raise ValueError(f"--shared {n_shared!r} is invalid: expected 0 or a multiple of --granularity {G} (the "
                         f"shared experts hold whole copies of the FFN, {G} experts of width {F // G} each)")
    if not isinstance(first_k_dense, int) or not 0 <= first_k_dense < L:
        raise ValueError(f"--first-k-dense {first_k_dense!r} is invalid: expected 0..{L - 1} (layers kept dense)")
    scale = float(G) if n_shared == 0 else G / 2
    return config.replace(n_routed_experts=n_experts, num_experts_per_tok=top_k, n_shared_experts=n_shared,
                          moe_intermediate_size=F // G, first_k_dense_replace=first_k_dense, n_group=1,
                          topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                          routed_scaling_factor=scale)


def upcycle_model(dense: CausalLM, n_experts: int, top_k: int, n_shared: int = 0, granularity: int = 1,
                  first_k_dense: int = 0, seed: int = 0) -> tuple[CausalLM, UpcycleReport]:
    """The DeepSeekMoE upcycled from `dense` (every FFN from layer `first_k_dense` on, and the MTP modules'): see
    the module docstring. `seed` draws the router rows."""
    config = upcycle_config(dense.config, n_experts, top_k, n_shared, granularity, first_k_dense)
    moe = CausalLM(config)
    moe_paths = [name for name, m in moe.named_modules() if isinstance(m, MoE)]
    dense_modules, moe_modules = dict(dense.named_modules()), dict(moe.named_modules())
    for path in moe_paths:
        if not isinstance(dense_modules.get(path), MLP):
            raise RuntimeError(f"upcycle: {path} is no dense MLP in the dense model")
    skip = tuple(f"{p}." for p in moe_paths)
    kept = {k: v for k, v in dense.state_dict().items() if not k.startswith(skip)}
    missing, unexpected = moe.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(skip) for k in missing):
        raise RuntimeError(f"upcycle: unexpected state-dict mismatch {missing} {unexpected}")
    generator = torch.Generator().manual_seed(seed)
    shared_scale = granularity / (2 * n_shared) if n_shared else 1.0
    for path in moe_paths:
        _fill_layer(dense_modules[path], moe_modules[path], config, granularity, shared_scale, generator)
    moe = moe.to(next(dense.parameters()).dtype).eval()
    return moe, UpcycleReport(moe_paths, n_experts // granularity, config.routed_scaling_factor, shared_scale)


@torch.no_grad()
def _fill_layer(ffn: MLP, moe: MoE, config: ModelConfig, G: int, shared_scale: float,
                generator: torch.Generator) -> None:
    """Experts from slices of copies of `ffn`, tiled router rows, shared experts from whole copies."""
    gate, up, down = (w.detach().float() for w in (ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight))
    I, copies = config.moe_intermediate_size, config.n_routed_experts // G
    gate_s, up_s = gate.view(G, I, -1), up.view(G, I, -1)  # [G, I, H]: slice g is rows g*I:(g+1)*I
    down_s = down.view(down.shape[0], G, I).transpose(0, 1)  # [G, H, I]
    experts = moe.experts
    experts.gate_up_proj.copy_(torch.cat([gate_s, up_s], dim=1).repeat(copies, 1, 1))  # expert c*G + g = slice g
    experts.down_proj.copy_(down_s.repeat(copies, 1, 1))
    rows = torch.randn((copies, gate.shape[1]), generator=generator) * config.initializer_range
    moe.gate.weight.copy_(rows.repeat_interleave(G, dim=0))  # the G slices of a copy score alike
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.zero_()
    if moe.shared_experts is not None:
        whole = config.n_shared_experts // G  # copies of the FFN in the shared MLP
        moe.shared_experts.gate_proj.weight.copy_(gate.repeat(whole, 1))
        moe.shared_experts.up_proj.weight.copy_(up.repeat(whole, 1))
        moe.shared_experts.down_proj.weight.copy_(down.repeat(1, whole) * shared_scale)
