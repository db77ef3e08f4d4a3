"""GRPO's data: each rollout samples G completions of a step's prompts with the inference Engine (recording their
routing), rewards them, and hands the Trainer micro-batches of sequences with advantages, completion masks and the
reference policy's log-probabilities; `grpo_forward` is the objective the Trainer runs on them.

The rollout of step k draws its prompts and sampling seeds from (seed, k), so a resumed run rolls out what the
uninterrupted one would have from the same weights (exact at rollout boundaries: with num_iterations > 1 a run
resumed between the iterations of one rollout samples it again from the newer weights).

Under torchrun each rank takes a contiguous slice of the step's prompts (the same prompts and per-completion
sampling seeds as one process: the completions are those one process samples from the same weights), samples them
from a full copy of the current weights (rollout_sync.py says why a copy), rewards them and computes their group
advantages locally (whole groups stay on one rank), and trains on them. The loss's divisor (completions or tokens
of the whole step) and the logged figures are summed over ranks, so the step's loss and gradient are one
process's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..inference.chat_template import CHAT_STOP
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from ..train.config import TrainConfig
from .evaluate import chat_prompt_ids
from .grpo import GRPOConfig, group_advantages, grpo_loss
from .reward_worker import check_reward
from .routing_replay import RoutingRecorder, capture_routing, main_moe_layers, mismatch_rate, replay_routing
from .rollout_sync import InferencePolicy, rank_slice
from .sft_data import IGNORE


@dataclass
class RolloutBatch:
    """Completions as training sequences: input_ids and labels [B, S] (labels = the token on completion tokens,
    -100 elsewhere), advantages [B], per-token log-probabilities [B, S-1] of the reference (and of the sampling
    policy when num_iterations > 1), and the rollout's experts per MoE layer [B*S, top_k] (-1: not recorded)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    # The loss_type's divisor over the whole step (every rank's completions) / (this rank's micro-batches x ranks):
    # TrainStep averages micro-batches and FSDP averages ranks, so the step's gradient is sum / divisor.
    denominator: float
    experts: list[torch.Tensor] | None = None
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None

    def to(self, device: torch.device) -> "RolloutBatch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return RolloutBatch(move(self.input_ids), move(self.labels), move(self.advantages), self.denominator,
                            None if self.experts is None else [move(e) for e in self.experts],
                            move(self.ref_logp), move(self.old_logp))


@dataclass
class GRPOOutput:
    """What TrainStep reads of a GRPO micro-batch (the LOSS_PARTS, expert counts, and figures to log)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor | None
    balance_loss: torch.Tensor | None
    expert_counts: torch.Tensor | None
    mtp_loss: None = None
    metrics: dict = field(default_factory=dict)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(input_ids[:, t+1] | ...) from logits [B, S, V] -> [B, S-1], in fp32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def make_grpo_forward(grpo: GRPOConfig):
    """The GRPO objective for TrainStep: the clipped surrogate (+ beta KL) over completion tokens, plus the
    model's balance losses; with routing replay the MoE layers use the rollout's experts, without it the share of
    (token, layer) choices that differ from the rollout's is logged as `routing_mismatch`."""

    def grpo_forward(model, batch: RolloutBatch, device: torch.device, window, mtp_loss_weight: float | None = None):
        # The MTP modules do not run in GRPO (mtp=False): their weight has nothing to weigh.
        b = batch.to(device)
        replay = b.experts if grpo.routing_replay else None
        with replay_routing(model, replay), capture_routing(model) as chosen:
            out = model(b.input_ids, labels=b.labels, mtp=False, balance_window=window)
        logp = sequence_logprobs(out.logits, b.input_ids)
        mask = b.labels[:, 1:] != IGNORE
        old = logp.detach() if b.old_logp is None else b.old_logp
        loss, metrics = grpo_loss(logp, old, b.advantages, mask, grpo, b.denominator, b.ref_logp)
        if b.experts is not None and not grpo.routing_replay:
            valid = (b.experts[0] >= 0).all(dim=-1)
            metrics["routing_mismatch"] = mismatch_rate([c[0] for c in chosen], b.experts, valid)
        balance, counts = out.balance_loss, out.expert_counts
        missing = len(model.moe_layers()) - (0 if counts is None else counts.shape[0])
        if counts is not None and missing:  # the MTP modules did not run: zero rows, so their biases stay put
            counts = torch.cat([counts, counts.new_zeros(missing, counts.shape[1])])
        return GRPOOutput(loss + (balance if balance is not None else 0), out.lm_loss, balance, counts,
                          metrics=metrics)

    return grpo_forward


class Rollouts:
    """The Trainer's data for GRPO (`make_data`): every `num_iterations` steps a fresh rollout of
    `prompts_per_step` prompts x `num_generations` completions from the policy being trained (`bind` gives it);
    under torchrun, data-parallel rank `rank` of `world_size` rolls out and trains on its slice of the prompts."""

    def __init__(self, task, tokenizer, config: TrainConfig, grpo: GRPOConfig, hf_tokenizer=None, rank: int = 0,
                 world_size: int = 1):
        self.task, self.tok, self.config, self.grpo = task, tokenizer, config, grpo
        self.rank, self.world_size = rank, world_size
        self.mine = rank_slice(grpo.prompts_per_step, rank, world_size, "prompts_per_step")  # this rank's prompts
        self.tokenizer = hf_tokenizer  # what checkpoints and final/ save
        self.rollouts_done = 0  # rollouts sampled so far
        self.iteration = 0  # optimizer steps taken on the current rollout
        self._resumed_iteration = 0  # iterations already taken on the rollout a resumed run samples again
        self._batches: list[RolloutBatch] | None = None
        self._metrics: dict = {}
        self._tokens = 0
        self.model = self.reference = self.engine = self.policy = None
        self.reduce = None  # sums over ranks (None in one process)
        self.train: list = []  # TrainData's name; GRPO has no fixed set of sequences
        self.meta = {"task": getattr(task, "name", type(task).__name__), **grpo.to_dict()}

    def bind(self, model, device: torch.device, reference=None, reduce=None) -> None:
        """The policy to sample from (the Trainer's model), the frozen reference (None when beta = 0), and under
        torchrun `reduce`, the sum over ranks (the Trainer's). Under torchrun this is a collective (it gathers the
        weights into each rank's inference copy)."""
        if self.world_size > 1 and reduce is None:
            raise ValueError(f"Rollouts of rank {self.rank} of {self.world_size}: bind() needs reduce, the sum over "
                             f"ranks")
        self.model, self.device, self.reference, self.reduce = model, device, reference, reduce
        self.policy = InferencePolicy(model, device, distributed=self.world_size > 1)
        max_len = min(model.config.max_position_embeddings, 1024)
        batch = min(len(self.mine) * self.grpo.num_generations, 64)
        self.engine = Engine(self.policy.model, self.tok, max_batch_size=batch, max_seq_len=max_len)
        model.train()  # Engine() puts the model in eval mode

    def describe(self) -> str:
        """For the trainer's start-up line."""
        g = self.grpo
        return (f"GRPO on task {self.meta['task']}: {g.prompts_per_step} prompts x {g.num_generations} completions "
                f"of <= {g.max_new_tokens} tokens a rollout"
                + (f" ({len(self.mine)} prompts a process)" if self.world_size > 1 else ""))

    @property
    def tokens_per_step(self) -> int:
        """Tokens of the latest rollout's sequences (an estimate before the first)."""
        return self._tokens or self.grpo.prompts_per_step * self.grpo.num_generations * self.grpo.max_new_tokens

    def metrics(self) -> dict:
        """The current rollout's figures for the step's metrics record."""
        return dict(self._metrics)

    def next_micro_batches(self) -> list[RolloutBatch]:
        """The current rollout's micro-batches, sampling a new rollout every num_iterations steps."""
        if self._batches is None or self.iteration >= self.grpo.num_iterations:
            self._batches = self._rollout(self.rollouts_done)
            self.rollouts_done += 1
            self.iteration, self._resumed_iteration = self._resumed_iteration, 0
        self.iteration += 1
        return self._batches

    def score(self, prompts: list[str], max_new_tokens: int) -> float:
        """The mean greedy reward of the current policy on `prompts`, each rank scoring its share (a collective
        under torchrun)."""
        from .evaluate import score_task

        policy = self.policy.refresh()
        share = -(-len(prompts) // self.world_size)
        mine = prompts[self.rank * share:(self.rank + 1) * share]
        total = score_task(policy, self.tok, self.task, mine, max_new_tokens)["mean_reward"] * len(mine) if mine \
            else 0.0
        if self.reduce is not None:
            total = float(self.reduce(torch.tensor(total, dtype=torch.float64, device=self.device)))
        return total / len(prompts)

    def val_batches(self) -> list:
        """None: GRPO is scored by its task's reward (rl.py), not a validation loss."""
        return []

    def state_dict(self) -> dict:
        """The rollouts sampled and the steps taken on the current one."""
        return {"rollouts_done": self.rollouts_done, "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position `state_dict` returned."""
        self.rollouts_done, self.iteration = state["rollouts_done"], state["iteration"]
        self._batches = None
        if 0 < self.iteration < self.grpo.num_iterations:  # stopped between the iterations of one rollout:
            self.rollouts_done -= 1  # sample it again, and take its remaining iterations
            self._resumed_iteration, self.iteration = self.iteration, self.grpo.num_iterations

    # ----- one rollout -----
    @torch.no_grad()
    def _rollout(self, index: int) -> list[RolloutBatch]:
        g, c = self.grpo, self.config
        seed = c.seed * 1_000_003 + index
        # The step's prompts and seeds are one process's; this rank samples completions first..first + its share.
        prompts = self.task.prompts(g.prompts_per_step, seed)[self.mine.start:self.mine.stop]
        first = self.mine.start * g.num_generations
        prompt_ids = [chat_prompt_ids(self.tok, p) for p in prompts]
        params = [SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, stop=list(CHAT_STOP),
                                 seed=seed * 4096 + first + i) for i in range(len(prompts) * g.num_generations)]
        ids = [p for p in prompt_ids for _ in range(g.num_generations)]
        policy = self.policy.refresh()
        policy.eval()
        try:
            with RoutingRecorder(policy, self.engine, self.engine.max_seq_len) as recorder:
                requests = self.engine.generate(ids, params)
        finally:
            self.model.train()
        eos = self.tok.eos_token_id
        sequences, starts, rewards, lengths, routes = [], [], [], [], []
        for i, r in enumerate(requests):
            completion = list(r.output_ids)
            by_stop_string = any(s in self.tok.decode(completion) for s in CHAT_STOP)
            if r.finish_reason == "stop" and not by_stop_string:
                completion.append(eos)  # the policy chose to end here: train that choice too
            if not completion:
                completion = [eos]
            sequences.append(r.prompt_ids + completion)
            starts.append(len(r.prompt_ids))
            prompt = prompts[i // g.num_generations]
            rewards.append(check_reward(self.task.reward(prompt, r.text), prompt))  # any Task, built-in or not
            lengths.append(len(completion))
            routes.append(recorder.routes.get(r.id))
        rewards_t = torch.tensor(rewards)
        advantages = group_advantages(rewards_t, g.num_generations, g.scale_rewards)
        # Every rank's rewards (each rank fills its own places of a zeroed vector, and the sum over ranks is all of
        # them) and the step's token counts [completion tokens, sequence tokens], in float64: counts stay exact.
        every = torch.zeros(g.prompts_per_step * g.num_generations + 2, dtype=torch.float64)
        every[first:first + len(rewards)] = rewards_t.double()
        every[-2:] = torch.tensor([sum(lengths), sum(len(s) for s in sequences)], dtype=torch.float64)
        if self.reduce is not None:
            every = self.reduce(every.to(self.device)).cpu()
        all_rewards = every[:-2].float()  # [prompts_per_step x G], as one process has them
        n, (total_tokens, self._tokens) = all_rewards.numel(), every[-2:].tolist()
        grouped_std = all_rewards.view(-1, g.num_generations).std(dim=1)
        self._metrics = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
                         "completion_length": total_tokens / n,
                         "groups_without_signal": float((grouped_std == 0).float().mean()), "rollout": index}
        self._tokens = int(self._tokens)
        mine = len(sequences)
        n_micro = -(-mine // c.batch_size)
        denominator = {"grpo": n, "dapo": total_tokens, "dr_grpo": n * g.max_new_tokens}[g.loss_type]
        denominator /= n_micro * self.world_size
        batches = []
        for m in range(n_micro):
            rows = range(m * c.batch_size, min((m + 1) * c.batch_size, mine))
            batches.append(self._batch([sequences[i] for i in rows], [starts[i] for i in rows],
                                       [routes[i] for i in rows], advantages[list(rows)], denominator))
        return batches

    def _batch(self, sequences: list[list[int]], starts: list[int], routes: list[torch.Tensor | None],
               advantages: torch.Tensor, denominator: float) -> RolloutBatch:
        B, S = len(sequences), max(len(s) for s in sequences)
        pad = self.tok.eos_token_id
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        labels = torch.full((B, S), IGNORE, dtype=torch.long)
        n_layers, k = len(main_moe_layers(self.model)), self.model.config.num_experts_per_tok
        experts = torch.full((n_layers, B, S, k), -1, dtype=torch.long) if n_layers else None
        for b, (seq, start, route) in enumerate(zip(sequences, starts, routes)):
            input_ids[b, :len(seq)] = torch.tensor(seq)
            labels[b, start:len(seq)] = torch.tensor(seq[start:])
            if experts is not None and route is not None:
                fed = min(len(seq), route.shape[1])
                experts[:, b, :fed] = route[:, :fed]  # the last token was never fed: it stays -1
        batch = RolloutBatch(input_ids, labels, advantages, denominator,
                             None if experts is None else list(experts.view(n_layers, B * S, k)))
        if self.reference is not None:
            batch.ref_logp = sequence_logprobs(self.reference(input_ids.to(self.device)).logits, input_ids.to(
                self.device)).cpu()
        if self.grpo.num_iterations > 1:  # the sampling policy's log-probabilities, before any update
            with replay_routing(self.model, None if batch.experts is None or not self.grpo.routing_replay
                                else [e.to(self.device) for e in batch.experts]):
                logits = self.model(input_ids.to(self.device), mtp=False).logits
            batch.old_logp = sequence_logprobs(logits, input_ids.to(self.device)).cpu()
        return batch
