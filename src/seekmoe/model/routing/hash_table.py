"""DeepSeek-V4's hash-routed MoE layers (`mlp_layer_types: hash_moe`): a frozen token id -> top-k experts table
(`tid2eid`, read from the checkpoint) chooses the experts; the learned gate still weighs them as DeepSeek's router
does (scoring_func affinities of the chosen experts, normalized, scaled)."""

from __future__ import annotations

import torch

from ...config import ModelConfig
from .deepseek import DeepSeekRouter
from .interface import Scores

TABLE_SEED = 1234  # a fresh model's table (a checkpoint's replaces it)


class HashTableRouter(DeepSeekRouter):
    """Experts = tid2eid[token id] [top_k]; weights from the learned gate's affinities of those experts. Balance
    losses and the selection bias do not apply: nothing learned chooses."""

    uses_balance_losses = False
    ranks_experts = False

    def __init__(self, config: ModelConfig):
        super().__init__(config, selection_bias=False)
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) gate; a fixed table dealing each expert vocab * top_k / E (token, slot) pairs, the top_k
        experts of a token distinct (consecutive ids after a seeded permutation)."""
        super().reset_parameters(std)
        vocab = self.tid2eid.shape[0]
        perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(TABLE_SEED))
        first = torch.empty(vocab, dtype=torch.long)
        first[perm] = torch.arange(vocab) % self.n_experts
        table = (first.unsqueeze(1) + torch.arange(self.top_k)) % self.n_experts
        self.tid2eid.copy_(table.to(self.tid2eid.device))

    def check_table(self, where: str = "tid2eid") -> None:
        """ValueError naming `where` unless every entry of the table is an expert id in [0, n_routed_experts)."""
        bad = (self.tid2eid < 0) | (self.tid2eid >= self.n_experts)
        if bool(bad.any()):
            token, slot = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{where}[{token}, {slot}]={int(self.tid2eid[token, slot])} is out of range: expected "
                             f"expert ids in [0, n_routed_experts={self.n_experts})")

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> Scores:
        """The gate's affinities; no ranking (the table decides)."""
        if token_ids is None:
            raise ValueError("mlp_layer_types='hash_moe' routes by token id: the MoE layer needs token_ids (the "
                             "model passes its input_ids; call MoE(x, token_ids=...) when using a layer on its own)")
        if token_ids.numel() != hidden.shape[0]:
            raise ValueError(f"hash routing got {token_ids.numel()} token ids for {hidden.shape[0]} tokens")
        scored = super().score(hidden, token_ids)
        return Scores(scored.logits, scored.scores, None)

    def select(self, scored: Scores, ranking: torch.Tensor | None, k: int,
               token_ids: torch.Tensor | None) -> torch.Tensor:
        """tid2eid[token_ids] -> [T, top_k]."""
        return self.tid2eid[token_ids.reshape(-1)]
