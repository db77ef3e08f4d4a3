"""Adapting a model from outside: `apply_lora` walks a CausalLM, puts `LoRALinear` in place of the targeted dense
projections, adds a `LoRAExperts` provider to each targeted MoE layer's routed experts, and freezes everything else.

What stays as it is, and why:
- The routers are frozen unless `router` is a target, and their selection biases (e_score_correction_bias) keep
  moving by the auxiliary-loss-free rule after every step: the bias is no gradient parameter, and the load it
  balances is that of the *adapted* experts, which drifts as the adapters learn.
- The MTP modules (`model.mtp.K`) are adapted like the main blocks (attention, shared experts, experts; their eh_proj
  is frozen), so fine-tuning keeps them in step with the adapted model they draft for. transformers' DeepseekV3 has
  no MTP, so PEFT's adapter_model.safetensors leaves their factors out (peft_format.py keeps them beside it, in a
  file of seekmoe's own, which `seekmoe merge` applies): final/ holds them merged.
- Embeddings, LM head and norms are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.mlp import MLP
from ..model.moe import MoE
from .config import LoRAConfig
from .layers import LoRAExperts, LoRALinear
from .nf4 import NF4Experts, to_nf4

PROVIDER = "lora"  # the experts' provider name: state-dict keys `...experts.providers.lora.gate_up_A`
MTP_PREFIX = "model.mtp."  # the MTP modules' state-dict names (model.mtp.K...)
NF4_PROVIDER = "nf4"


@dataclass
class AdaptedModel:
    """What `apply_lora` did: the adapted modules by name, and the parameter counts."""

    linears: dict[str, LoRALinear]  # module path -> adapted projection
    experts: dict[str, LoRAExperts]  # path of the RoutedExperts -> its adapters
    routers: list[str]  # module paths of the MoE routers (trained when `router` is a target)
    trainable_params: int
    total_params: int

    def describe(self) -> str:
        """One line for the run's log."""
        share = 100 * self.trainable_params / max(self.total_params, 1)
        return (f"LoRA: training {self.trainable_params:,} of {self.total_params:,} parameters ({share:.2f}%) in "
                f"{len(self.linears)} projections and {len(self.experts)} expert stacks; the rest is frozen")


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]


def apply_lora(model: nn.Module, config: LoRAConfig, layers: list[int] | None = None,
               mtp: bool | None = None) -> AdaptedModel:
    """Adapt the decoder layers and MTP modules of `model` (a CausalLM) in place as `config` says and freeze the
    rest; returns what was adapted. ValueError (before any change) when the rank exceeds a targeted width. `layers`
    adapts (and freezes) only those decoder layers, for a model adapted block by block as it is read (load.py);
    `mtp` whether the MTP modules are adapted (default: when `layers` is None)."""
    config.check_widths(model.config)
    targets, r, s = set(config.target_set), config.rank, config.scaling
    if config.quantize == "nf4":
        from .nf4 import require_torchao

        require_torchao()
    if layers is None:
        model.requires_grad_(False)
    linears: dict[str, LoRALinear] = {}
    experts: dict[str, LoRAExperts] = {}
    routers: list[str] = []

    def adapt(parent: nn.Module, path: str) -> None:
        for name, child in _linears(parent):
            wrapped = LoRALinear(child, r, s, config.dropout)
            setattr(parent, name, wrapped)
            linears[f"{path}.{name}"] = wrapped

    blocks = [(f"model.layers.{i}", model.model.layers[i])
              for i in (range(len(model.model.layers)) if layers is None else layers)]
    adapt_mtp = layers is None if mtp is None else mtp
    if adapt_mtp:
        blocks += [(f"{MTP_PREFIX}{k}", module) for k, module in enumerate(getattr(model.model, "mtp", ()))]
    for path, block in blocks:
        block.requires_grad_(False)
        first = len(linears)
        if "attention" in targets:
            adapt(block.self_attn, f"{path}.self_attn")
        mlp = block.mlp
        if isinstance(mlp, MoE):
            routers.append(f"{path}.mlp.gate")
            if "shared-experts" in targets and mlp.shared_experts is not None:
                adapt(mlp.shared_experts, f"{path}.mlp.shared_experts")
            if "experts" in targets:
                e = mlp.experts
                device = e.gate_up_proj.device
                provider = LoRAExperts(e.n_experts, e.hidden_size, e.intermediate_size, r, s,
                                       device=None if device.type == "meta" else device)
                e.add_provider(PROVIDER, provider)
                experts[f"{path}.mlp.experts"] = provider
            if "router" in targets:
                mlp.gate.weight.requires_grad_(True)
            if config.quantize == "nf4":
                mlp.experts.add_provider(NF4_PROVIDER, NF4Experts(mlp.experts))
        elif isinstance(mlp, MLP) and "dense-mlp" in targets:
            adapt(mlp, f"{path}.mlp")
        if config.quantize == "nf4":
            quantize_base(dict(list(linears.items())[first:]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return AdaptedModel(linears, experts, routers, trainable, total)


def quantize_base(linears: dict[str, LoRALinear]) -> None:
    """QLoRA: the frozen base weights of the adapted projections in NF4 (the routed experts': NF4Experts)."""
    for wrapped in linears.values():
        base = wrapped.base_layer
        base.weight = nn.Parameter(to_nf4(base.weight.data), requires_grad=False)


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of an adapted model by state-dict name: every adapter factor (the MTP modules' too), and
    each decoder layer's MoE router's weight and selection bias (the bias moves during training whatever the
    targets)."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if name.endswith((".lora_A", ".lora_B")) or f".providers.{PROVIDER}." in name:
            out[name] = tensor
        elif name.startswith(("model.layers.", MTP_PREFIX)) and (name.endswith(".mlp.gate.weight")
                                                   or name.endswith(".mlp.gate.e_score_correction_bias")):
            out[name] = tensor
    return out
