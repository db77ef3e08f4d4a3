"""Which parameters a run trains (`seekmoe train --train new-experts,router`): the rest are frozen, so they get no
gradient, no gradient memory and no optimizer state, and stay bit-identical.

A selection is a comma-separated list of names (`all`, `new-experts`, `router`, `experts`, `shared-experts`,
`attention`, `dense-mlp`, `embeddings`, `norms`, `mtp`) and glob patterns of parameter names
(`model.layers.*.mlp.gate.weight`). The routed experts of a layer are two stacked tensors ([E, 2I, H] and
[E, H, I]), so `new-experts` cannot just flag them: their new rows become parameters of their own
(`experts.trainable_gate_up_proj`, [N, 2I, H]) that the forward writes into a copy of the frozen stack
(`PartlyTrainableExperts`), and the checkpoint keeps the usual per-expert keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..model.experts import RoutedExperts
from .record import GrowRecord

NAMED: dict[str, tuple[str, ...]] = {
    "router": ("*.mlp.gate.weight",),
    "experts": ("*.mlp.experts.*",),
    "shared-experts": ("*.mlp.shared_experts.*",),
    "attention": ("*.self_attn.*",),
    "dense-mlp": ("*.mlp.gate_proj.weight", "*.mlp.up_proj.weight", "*.mlp.down_proj.weight"),
    "embeddings": ("model.embed_tokens.weight", "lm_head.weight"),
    "norms": ("*norm.weight",),
    "mtp": ("model.mtp.*",),
}
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


@dataclass
class TrainableSelection:
    """What `select_trainable` left trainable."""

    trainable_params: int
    frozen_params: int
    trainable_names: list[str]

    def describe(self) -> str:
        """One line for the run's log."""
        total = self.trainable_params + self.frozen_params
        share = 100 * self.trainable_params / total
        return (f"training {self.trainable_params:,} of {total:,} parameters ({share:.1f}%)"
                f" in {len(self.trainable_names)} tensors; the rest is frozen")


def select_trainable(model: nn.Module, spec: str) -> TrainableSelection:
    """Freeze every parameter of `model` that `spec` does not name (see the module docstring); `new-experts`
    splits the added experts' rows off their layers' stacked expert tensors. Returns what is trained."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ValueError(f"--train {spec!r} is empty: expected 'all', names ({', '.join(['new-experts', *NAMED])}) "
                         f"or glob patterns of parameter names, comma-separated")
    names = dict(model.named_parameters())
    if "all" in items:
        for p in names.values():
            p.requires_grad_(True)
        return _selection(model)
    chosen: set[str] = set()
    for item in items:
        if item == "new-experts":
            continue
        patterns = NAMED.get(item, (item,))
        matched = {n for n in names if any(fnmatchcase(n, p) for p in patterns)}
        if not matched:
            example = next(iter(names))
            raise ValueError(f"--train item {item!r} matches no parameter: expected one of 'all', 'new-experts', "
                             f"{', '.join(repr(k) for k in NAMED)} or a glob of parameter names such as {example!r}")
        chosen |= matched
    for n, p in names.items():
        p.requires_grad_(n in chosen)
    if "new-experts" in items:
        record = GrowRecord.of(model.config)
        if record is None or not record.new:
            raise ValueError("--train new-experts: this model records no added experts (no 'grown_experts' in its "
                             "config.json): expand it with `seekmoe expand` first, or name what to train")
        modules = dict(model.named_modules())
        for path, ids in record.new.items():
            experts = modules[f"{path}.experts"]
            whole = {t for t in EXPERT_TENSORS if f"{path}.experts.{t}" in chosen}
            if whole != set(EXPERT_TENSORS):
                make_partly_trainable(experts, ids, [t for t in EXPERT_TENSORS if t not in whole])
    return _selection(model)


def _selection(model: nn.Module) -> TrainableSelection:
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return TrainableSelection(sum(c for _, c in trainable), frozen, [n for n, _ in trainable])


def make_partly_trainable(experts: RoutedExperts, ids: list[int], tensors: list[str]) -> None:
    """Train only experts `ids` of `tensors` (of 'gate_up_proj', 'down_proj'): their rows become the parameters
    `trainable_{tensor}` [len(ids), ...]; the stacked tensor is frozen."""
    experts.__class__ = PartlyTrainableExperts
    experts.register_buffer("trainable_ids", torch.tensor(ids, device=experts.gate_up_proj.device),
                            persistent=False)
    for name in tensors:
        full = getattr(experts, name)
        full.requires_grad_(False)
        experts.register_parameter(f"trainable_{name}", nn.Parameter(full.detach()[experts.trainable_ids].clone()))


class PartlyTrainableExperts(RoutedExperts):
    """RoutedExperts of which only some experts train: the forward uses the frozen stack with the trainable rows
    written in (a copy: one layer's expert weights of extra activation memory, against no gradient or optimizer
    state for the frozen experts). Its state dict is a plain RoutedExperts' one, the trainable rows merged in."""

    trainable_ids: torch.Tensor  # [N] long

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) with the trainable experts' rows in place (differentiable in those rows)."""
        return tuple(self._merged(name) for name in EXPERT_TENSORS)

    def _merged(self, name: str) -> torch.Tensor:
        full, part = getattr(self, name), getattr(self, f"trainable_{name}", None)
        return full if part is None else full.index_copy(0, self.trainable_ids, part.to(full.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in EXPERT_TENSORS:
            if destination.pop(f"{prefix}trainable_{name}", None) is not None:
                merged = self._merged(name)
                destination[prefix + name] = merged if keep_vars else merged.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in EXPERT_TENSORS:
            if hasattr(self, f"trainable_{name}") and prefix + name in state_dict:
                rows = state_dict[prefix + name][self.trainable_ids.to(state_dict[prefix + name].device)]
                state_dict[f"{prefix}trainable_{name}"] = rows
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
