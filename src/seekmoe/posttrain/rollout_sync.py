"""The weights GRPO's rollouts sample from under torchrun, and each rank's share of a step's prompts.

Under torchrun every rank rolls out its own slice of a step's prompts (whole groups of G completions, so the group
advantages need no communication) and trains on it; FSDP averages the gradients. The inference Engine needs the
whole model to generate, and under FSDP2 (and expert parallelism) each rank holds shards only. Two ways were open:
(a) the engine on the FSDP-wrapped model itself, letting FSDP2 all-gather each block in its forward, or (b) a full
plain copy of the weights gathered before each rollout. This module does (b):
- (a) makes every forward a collective: every rank would have to run the same number of engine forwards (prefill
  chunks and decode steps differ with each rank's prompts and stop tokens, so padding forwards are needed), the
  engine's decoding forwards would all-gather every block once per generated token (tokens x layers collectives a
  rollout), and under expert parallelism each of them is an all-to-all too, with batch shapes that differ by rank.
- (b) costs one all-gather of the weights per rollout (once per `num_iterations` optimizer steps) and then
  generates with no communication at all, on the plain model the single-process engine already runs (same
  numerics: the completions of a 2-process run are those of one process). Its price is memory: each rank holds
  one full copy of the model in the training parameters' dtype (fp32: 4 bytes a parameter) besides its shards,
  and while the copy is refreshed the gathered state dict briefly doubles that. Right for the small and mid-sized
  policies RL is run on here; a policy that does not fit whole on one device needs (a) or a separate inference
  service, which this does not do.
In one process the policy is the Trainer's model itself (no copy).

Measured (2 gloo processes on a shared 2-core AMD EPYC, OMP_NUM_THREADS=1; benchmarks/rl_rollout_sync.py): a 31M-
parameter MoE (`--preset small hidden_size=512 n_routed_experts=16 moe_intermediate_size=256 intermediate_size=1024
vocab_size=8192`) refreshes its 119 MB copy in 0.16 s (FSDP dp=2) / 0.25 s (ep=2), against 0.8 / 1.1 s for the
rollout of 16 completions x 16 tokens it serves; the `small` preset (2.2M) in 0.08-0.2 s. The engine does run on the
fully_shard-ed model itself when every rank runs the same requests (checked: the same completions as the copy's),
but took 0.55-0.69 s where the copy took 0.22-0.36 s for the same 16 x 16 rollout of `small`, before any padding
forwards for ranks whose rollouts differ.
"""

from __future__ import annotations

import logging

import torch
from torch import nn


class InferencePolicy:
    """What the Engine samples from: `model` itself in one process; under torchrun a plain copy of the whole model on
    `device`, refreshed from every rank's shards by `refresh()` (a collective: every rank calls it together)."""

    def __init__(self, model: nn.Module, device: torch.device, distributed: bool):
        self.source = model
        self.distributed = distributed
        if distributed:
            from .. import build_model

            self.model = build_model(model.config, device=device).eval().requires_grad_(False)
            self.refresh()
        else:
            self.model = model

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Bring the copy to the training model's current weights (and router biases); returns the policy model."""
        if not self.distributed:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..model.experts import fold_weight_providers

        # Gathering 2-D expert shards makes DTensor warn that it needs two all-gathers: true, harmless.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        # full_state_dict without cpu_offload: every rank receives every full tensor, on its own device.
        state = get_model_state_dict(self.source, options=StateDictOptions(full_state_dict=True))
        fold_weight_providers(self.source, state)  # partly frozen experts' trainable rows back into the stacks
        self.model.load_state_dict(state)
        del state
        return self.model


def rank_slice(total: int, rank: int, world_size: int, what: str) -> range:
    """The contiguous share of `total` items that `rank` of `world_size` takes; refuses a total that does not split
    evenly (every rank must run as many training forwards as the others: FSDP gathers in each)."""
    if total % world_size:
        raise ValueError(f"{what}={total} does not split among {world_size} processes: expected a multiple of "
                         f"{world_size} (each rank rolls out whole groups of the step's prompts)")
    share = total // world_size
    return range(rank * share, (rank + 1) * share)
