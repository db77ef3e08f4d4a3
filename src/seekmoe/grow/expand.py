"""Adding routed experts to a trained model's MoE layers (`seekmoe expand`), so it can learn a new domain in them.

With top-k fixed, a new expert that is ever selected changes the output: it takes a slot and, with normalized
weights, dilutes the others. Two starts:

- `zero`: each new expert is unselectable (its selection bias `e_score_correction_bias` sits more than the whole
  range of sigmoid scores below every old expert's) and its down projection is zero, so the expanded model computes
  exactly what the old one did. Training then brings traffic to it through the auxiliary-loss-free bias update,
  which raises an underloaded expert's bias by `bias_update_speed` a step (train/onboarding.py can make that faster for
  the new experts). Its gate/up projections and router row start random, as a fresh model's would; under DeepSeek-V4's
  `sqrtsoftplus` scores, which have no upper bound, its router row starts at zero instead, so that its score is the
  constant sqrt(softplus(0)) ~ 0.83 for every token and the same bias margin keeps it out of reach.
- `copy`: each new expert is a copy of an old expert of its group, with small relative noise on its weights, router
  row and bias, so it starts as a second specialist of what it copies; the output moves (the copy takes slots).

Since the added experts are never selected, the kept top-k and its normalization (`norm_topk_prob`) are the old ones:
elementwise scores (sigmoid, sqrtsoftplus) of the old experts do not depend on how many experts there are.

DeepSeek-V4's hash-routed layers (`mlp_layer_types: hash_moe`) choose experts by a frozen token table (`tid2eid`),
which names old experts only: their added experts get no tokens (recorded as dormant) unless `rehash` > 0 with
`copy`, which moves that fraction of each copied expert's (token, slot) entries, chosen at random with `seed`, to its
copies (split evenly among them), so a copy takes over part of its source's tokens as it does in the learned layers.
`zero` keeps the table: a zero expert taking a slot would change the output.

Router groups are contiguous runs of `n_routed_experts / n_group` experts, so new experts are inserted at the end of
every group (N / n_group per group) and the old ones renumbered: appending them all at the end would move old experts
into other groups and change group-limited routing. When N is not a multiple of n_group, n_group shrinks to a
divisor of both (groups merge) and the routing changes; the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..model import CausalLM
from ..model.moe import MoE
from ..train.grown_experts import RECORD_KEY, UNSELECTABLE_MARGIN, GrowRecord, unselectable_bias

INITS = ("copy", "zero")
# Scorings under which --init zero can keep added experts out of every top-k with a selection bias: elementwise ones
# whose score for the added experts' rows is bounded by 1 (sigmoid: any row; sqrtsoftplus: a zero row, ~0.83).
ZERO_INIT_SCORINGS = ("sigmoid", "sqrtsoftplus")


@dataclass
class ExpertLayout:
    """Where the experts go when N are added: the group settings, each old expert's new id, the new experts' ids
    and the old expert each new one would copy (same group)."""

    n_group: int
    topk_group: int
    old_to_new: list[int]  # [E] new id of old expert e
    added: list[int]  # [N] ids of the added experts, increasing
    source: list[int]  # [N] old id of the expert in the same group that added expert j copies
    changes: list[str] = field(default_factory=list)  # what had to change in the config, in words


@dataclass
class ExpandReport:
    """What `expand_model` did, for the command to print."""

    experts_before: int
    experts_after: int
    layers: list[str]  # MoE layers (module paths) that got live new experts
    dormant_layers: list[str]  # MoE layers whose added slots are dormant (left out by `layers`)
    changes: list[str]
    exact: bool  # whether the expanded model's outputs equal the old one's by construction
    notes: list[str] = field(default_factory=list)  # what the user should know (hash-routed layers)


def moe_layer_paths(model: CausalLM) -> dict[str, int]:
    """Module path of every MoE layer -> its layer number as on disk (MTP module j is layer num_hidden_layers + j)."""
    L = model.config.num_hidden_layers
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            parts = name.split(".")  # model.layers.3.mlp or model.mtp.0.mlp
            out[name] = int(parts[2]) + (L if parts[1] == "mtp" else 0)
    return out


def plan_layout(config: ModelConfig, n_add: int) -> ExpertLayout:
    """The expert numbering after adding `n_add` experts: n_add / n_group at the end of every router group, merging
    groups (fewer, larger ones) when n_add is not a multiple of n_group."""
    if not isinstance(n_add, int) or n_add < 1:
        raise ValueError(f"--add-experts {n_add!r} is invalid: expected a positive number of experts")
    E, G, TG, K = config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok
    changes = []
    groups, topk_group = G, TG
    if n_add % G:
        groups = max(d for d in range(1, G + 1) if G % d == 0 and n_add % d == 0)
        topk_group = max(1, TG * groups // G)
        per_group = (E + n_add) // groups
        while config.topk_method != "greedy" and groups > 1 and topk_group * per_group < K:
            topk_group += 1
        routing = ("" if config.topk_method == "greedy" or G == 1 else
                   "; group-limited routing changes, so the expanded model's outputs differ from the old one's "
                   "even with --init zero")
        changes.append(f"n_group {G} -> {groups} and topk_group {TG} -> {topk_group}: {n_add} added experts cannot be "
                       f"spread evenly over {G} groups, so every {G // groups} neighbouring groups merge into one of "
                       f"{per_group} experts{routing}")
    per_old, per_new = E // groups, n_add // groups
    old_to_new = [(e // per_old) * (per_old + per_new) + e % per_old for e in range(E)]
    added = [g * (per_old + per_new) + per_old + j for g in range(groups) for j in range(per_new)]
    source = [g * per_old + j % per_old for g in range(groups) for j in range(per_new)]
    return ExpertLayout(groups, topk_group, old_to_new, added, source, changes)


def expand_model(model: CausalLM, n_add: int, layers: list[int] | None = None, init: str = "copy",
                 noise: float = 0.01, seed: int = 0, rehash: float = 0.0) -> tuple[CausalLM, ExpandReport]:
    """A copy of `model` with `n_add` more routed experts in every MoE layer (new ones live only in `layers`, by
    on-disk layer number, when given), initialized by `init` ('copy' or 'zero', see the module docstring), the added
    experts recorded in the config (record.py; a record of an earlier expansion is replaced: its experts count as
    old now). `noise` is the relative noise of `copy`; `seed` makes it repeatable; `rehash` is the fraction of each
    copied expert's token-table entries moved to its copies in hash-routed layers (`copy` only)."""
    config = model.config
    if config.n_routed_experts == 0:
        raise ValueError("the model has no MoE layers (n_routed_experts=0): turn a dense model into a MoE with "
                         "`seekmoe upcycle` first")
    if init not in INITS:
        raise ValueError(f"--init {init!r} is invalid: expected one of {INITS}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"--noise {noise!r} is invalid: expected a non-negative number")
    has_bias = config.topk_method == "noaux_tc"
    if init == "zero" and not (has_bias and config.scoring_func in ZERO_INIT_SCORINGS):
        raise ValueError(f"--init zero needs a selection-bias router with elementwise scores (topk_method='noaux_tc', "
                         f"scoring_func one of {ZERO_INIT_SCORINGS}: DeepSeek-V3/V4; this model has "
                         f"{config.topk_method!r}, {config.scoring_func!r}): new experts are kept out of the top-k by "
                         f"a selection bias, and softmax scores would change with every added expert; use --init copy")
    if not (isinstance(rehash, (int, float)) and 0 <= rehash <= 1):
        raise ValueError(f"--rehash {rehash!r} is invalid: expected a fraction in [0, 1]")
    paths = moe_layer_paths(model)
    modules = dict(model.named_modules())
    hashed = {p for p in paths if hasattr(modules[p].gate, "tid2eid")}  # DeepSeek-V4's hash-routed layers
    if rehash and init != "copy":
        raise ValueError(f"--rehash {rehash} needs --init copy: a hash-routed token moved to an added '{init}' expert "
                         f"(zero down projection) would lose that expert's output, so the model would change")
    if rehash and not hashed:
        raise ValueError(f"--rehash {rehash}: this model has no hash-routed layers (mlp_layer_types 'hash_moe')")
    if layers is not None:
        unknown = sorted(set(layers) - set(paths.values()))
        if unknown:
            raise ValueError(f"--layers {unknown} are not MoE layers: expected some of {sorted(paths.values())} "
                             f"(layers {config.first_k_dense_replace}..{config.num_hidden_layers - 1}, then MTP "
                             f"modules from {config.num_hidden_layers})")
        if not has_bias:
            raise ValueError(f"--layers needs a selection bias (topk_method='noaux_tc', not "
                             f"{config.topk_method!r}): the layers left out get dormant, unselectable expert slots, "
                             f"since a config has one n_routed_experts for every layer")
    layout = plan_layout(config, n_add)
    live = {p for p, i in paths.items() if layers is None or i in layers}
    routed = live - (hashed if not rehash else set())  # where the added experts will get tokens
    record = GrowRecord(init=init, new={p: layout.added for p in paths if p in routed},
                        dormant={p: layout.added for p in paths if p not in routed},
                        unselectable_bias_margin=UNSELECTABLE_MARGIN)
    new_config = config.replace(n_routed_experts=config.n_routed_experts + n_add, n_group=layout.n_group,
                                topk_group=layout.topk_group, extra={**config.extra, RECORD_KEY: record.to_dict()})
    dtype = next(model.parameters()).dtype
    grown = CausalLM(new_config)
    expert_keys = {f"{p}.{k}" for p in paths for k in ("gate.weight", "gate.e_score_correction_bias",
                                                        "experts.gate_up_proj", "experts.down_proj")}
    kept = {k: v for k, v in model.state_dict().items() if k not in expert_keys}
    missing, unexpected = grown.load_state_dict(kept, strict=False)
    if set(missing) - expert_keys or unexpected:
        raise RuntimeError(f"expand: unexpected state-dict mismatch {missing} {unexpected}")
    generator = torch.Generator().manual_seed(seed)
    new_modules = dict(grown.named_modules())
    tables = torch.Generator().manual_seed(seed)  # the rehash's own stream: the copies' noise is the same without it
    notes = []
    for path in paths:
        moved = _fill_layer(modules[path], new_modules[path], layout,
                            "copy" if init == "copy" and path in live else "zero", noise, config.initializer_range,
                            generator, zero_rows=config.scoring_func != "sigmoid",
                            rehash=rehash if path in live else 0.0, table_generator=tables)
        if path in hashed and path in live:
            notes.append(f"{path} is hash-routed: " + (
                f"{moved[0]} of its token table's {moved[1]} entries that named a copied expert now name its copy "
                f"(--rehash {rehash:g})" if rehash else
                "its token table (tid2eid) names old experts only, so the added experts there get no tokens "
                "(dormant); --init copy --rehash F moves a fraction F of each copied expert's tokens to its copy"))
    grown = grown.to(dtype).eval()
    exact = init == "zero" and not layout.changes
    report = ExpandReport(config.n_routed_experts, new_config.n_routed_experts, sorted(routed, key=paths.get),
                          sorted(set(paths) - routed, key=paths.get), layout.changes, exact, notes)
    return grown, report


@torch.no_grad()
def _fill_layer(old: MoE, new: MoE, layout: ExpertLayout, init: str, noise: float, std: float,
                generator: torch.Generator, zero_rows: bool = False, rehash: float = 0.0,
                table_generator: torch.Generator | None = None) -> tuple[int, int]:
    """The old experts, router rows and biases at their new ids; the added ones initialized by `init` (`zero_rows`:
    zero router rows for `zero`, see the module docstring). A hash-routed layer's table is renumbered, and with
    `rehash` a fraction of its entries moved to the copies: returns (entries moved, entries that named a source)."""
    moved = (0, 0)
    keep = torch.tensor(layout.old_to_new)
    added, source = torch.tensor(layout.added), torch.tensor(layout.source)
    old_gate_up, old_down = (w.detach().float() for w in old.experts.expert_weights())  # [E, 2I, H], [E, H, I]
    old_router = old.gate.weight.detach().float()  # [E, H]
    experts, router = new.experts, new.gate
    for param, values in ((experts.gate_up_proj, old_gate_up), (experts.down_proj, old_down),
                          (router.weight, old_router)):
        param.index_copy_(0, keep, values.to(param.dtype))
    if hasattr(old.gate, "tid2eid"):  # a hash-routed layer (DeepSeek-V4): its token table names experts by new id
        table = keep[old.gate.tid2eid]  # [vocab, top_k]
        if rehash:
            table, moved = _rehash(table, keep[source], added, rehash, table_generator or generator)
        new.gate.tid2eid.copy_(table)
    old_bias = old.gate.e_score_correction_bias
    if old_bias is not None:
        router.e_score_correction_bias.index_copy_(0, keep, old_bias)

    def jitter(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        scale = values.std(dim=dims, keepdim=True) if values.numel() > 1 else values.abs()
        return values + noise * scale * torch.randn(values.shape, generator=generator)

    if init == "copy":
        experts.gate_up_proj.index_copy_(0, added, jitter(old_gate_up[source], (1, 2)))
        experts.down_proj.index_copy_(0, added, jitter(old_down[source], (1, 2)))
        router.weight.index_copy_(0, added, jitter(old_router[source], (1,)))
        if old_bias is not None:
            spread = old_bias.std() if old_bias.numel() > 1 else old_bias.new_zeros(())
            bias = old_bias[source] + noise * spread * torch.randn(len(layout.added), generator=generator)
            router.e_score_correction_bias.index_copy_(0, added, bias)
        return moved
    n = len(layout.added)
    experts.gate_up_proj.index_copy_(0, added, torch.randn((n, *old_gate_up.shape[1:]), generator=generator) * std)
    experts.down_proj.index_copy_(0, added, torch.zeros(n, *old_down.shape[1:]))
    rows = torch.randn((n, old_router.shape[1]), generator=generator) * std
    router.weight.index_copy_(0, added, rows.zero_() if zero_rows else rows)  # drawn anyway: same stream either way
    if old_bias is not None:
        router.e_score_correction_bias.index_copy_(0, added, unselectable_bias(old_bias).expand(n))
    return moved


def _rehash(table: torch.Tensor, sources: torch.Tensor, copies: torch.Tensor, fraction: float,
            generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """`table` [vocab, top_k] (expert ids) with `fraction` of the entries naming each source expert (sources[j], new
    ids) moved to its copies (copies[j]), chosen by a seeded permutation and split evenly among a source's copies. A
    token's experts stay distinct: a copy is a new id, in no row before. Returns (table, (moved, entries naming a
    source))."""
    table = table.clone()
    flat = table.view(-1)
    moved = total = 0
    for src in sources.unique().tolist():
        mine = copies[sources == src]
        where = (flat == src).nonzero().squeeze(1)
        where = where[torch.randperm(where.numel(), generator=generator)]
        take = int(round(fraction * where.numel()))
        flat[where[:take]] = mine[torch.arange(take) % mine.numel()]
        moved, total = moved + take, total + where.numel()
    return table, (moved, total)

