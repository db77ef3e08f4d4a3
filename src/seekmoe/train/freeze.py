"""Which parameters a run trains (`seekmoe train --train new-experts,router`): the rest are frozen, so they get no
gradient, no gradient memory and no optimizer state, and stay bit-identical.

A selection is a comma-separated list of names (`all`, `new-experts`, `router`, `experts`, `shared-experts`,
`attention`, `indexer`, `dense-mlp`, `embeddings`, `norms`, `mtp`) and glob patterns of parameter names
(`model.layers.*.mlp.gate.weight`). The routed experts of a layer are two stacked tensors ([E, 2I, H] and
[E, H, I]), so `new-experts` cannot just flag them: their new rows become parameters of their own
(`experts.providers.trainable.gate_up_proj`, [N, 2I, H]) of a weight provider, `TrainableRows`, that writes them into
a copy of the frozen stack in the forward. The state dict keeps the rows apart (the same keys in one process and
sharded); the Hugging Face layout folds them into the usual per-expert keys. As a provider it composes with expert
parallelism: it then writes the rows of this rank's experts into this rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..model.experts import ExpertWeights, RoutedExperts, WeightProvider
from .grown_experts import GrowRecord

NAMED: dict[str, tuple[str, ...]] = {
    "router": ("*.mlp.gate.weight",),
    "experts": ("*.mlp.experts.*",),
    "shared-experts": ("*.mlp.shared_experts.*",),
    "attention": ("*.self_attn.*",),
    "indexer": ("*.self_attn.indexer.*",),  # DeepSeek-V3.2's lightning indexers (their warm-up, --dsa-stage)
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
    """Train only experts `ids` of `tensors` (of 'gate_up_proj', 'down_proj'): their rows become the parameters of a
    `TrainableRows` provider; the stacked tensors are frozen."""
    experts.add_provider("trainable", TrainableRows(experts, ids, tensors))


class TrainableRows(WeightProvider):
    """Experts of which only some train: their rows of `tensors` are parameters here ([N, ...], N = len(ids), in
    the order of `ids`), written into a copy of the frozen stack in the forward (one layer's expert weights of extra
    activation memory, against no gradient or optimizer state for the frozen experts).

    The rows are every trainable expert's, on every rank: under expert parallelism each rank writes those of its own
    experts and gets zero gradient for the others', so that averaging the gradients over every rank (fsdp.py makes
    this provider a unit over all ranks) gives each row the gradient of the whole batch."""

    order = 20  # after expert parallelism's shards: it sees this rank's experts

    def __init__(self, experts: RoutedExperts, ids: list[int], tensors: list[str]):
        super().__init__()
        self.ids = [int(i) for i in ids]
        self._local: dict = {}  # (first expert, experts here, device) -> (rows to take, where they go)
        for name in tensors:
            full = getattr(experts, name)
            full.requires_grad_(False)
            index = torch.tensor(self.ids, device=full.device)
            self.register_parameter(name, nn.Parameter(full.detach().index_select(0, index).clone()))

    def _placement(self, first: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(which of our rows belong to the local experts first .. first + n - 1, their local expert ids)."""
        key = (first, n, device)
        if key not in self._local:
            mine = [(row, e - first) for row, e in enumerate(self.ids) if first <= e < first + n]
            rows, local = zip(*mine) if mine else ((), ())
            self._local[key] = (torch.tensor(rows, dtype=torch.long, device=device),
                                torch.tensor(local, dtype=torch.long, device=device))
        return self._local[key]

    def forward(self, weights: ExpertWeights) -> ExpertWeights:
        """The weights with the trainable rows written in (differentiable in those rows)."""
        merged = {}
        for name in EXPERT_TENSORS:
            full, part = getattr(weights, name), getattr(self, name, None)
            if part is not None:
                rows, local = self._placement(weights.first_expert, full.shape[0], full.device)
                full = full.index_copy(0, local, part.index_select(0, rows).to(full.dtype))
            merged[name] = full
        return ExpertWeights(merged["gate_up_proj"], merged["down_proj"], weights.first_expert)

    def fold_state(self, state: dict, prefix: str, own_prefix: str) -> None:
        for name in EXPERT_TENSORS:
            part = state.pop(own_prefix + name, None)
            if part is not None:
                full = state[prefix + name]
                index = torch.tensor(self.ids, device=full.device)
                state[prefix + name] = full.index_copy(0, index, part.to(full.device, full.dtype))

    def unfold_state(self, state: dict, prefix: str, own_prefix: str) -> None:
        for name in EXPERT_TENSORS:
            if hasattr(self, name) and own_prefix + name not in state and prefix + name in state:
                full = state[prefix + name]
                state[own_prefix + name] = full.index_select(0, torch.tensor(self.ids, device=full.device))
