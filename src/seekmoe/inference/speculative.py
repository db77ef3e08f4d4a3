"""Self-speculative decoding with MTP: the model's MTP modules draft the next tokens, the main model verifies them.

MTP module k combines h^{k-1}_j (the main model's final hidden state for k = 1, module k-1's output otherwise) with
Emb(t_{j+k}) and predicts t_{j+k+1}. After a verifying forward has kept the main model's states up to position P
and sampled t_{P+1}, module 1 at P drafts d_1 (for t_{P+2}), module 2 at P, fed d_1, drafts d_2, and so on: D
modules draft D tokens. The main model then scores [t_{P+1}, d_1, ..., d_D] in one forward: its prediction at each
position decides whether the next draft is accepted, and the prediction after the last accepted one is one more new
token, so a forward yields 1 to D + 1 tokens.

Each module keeps its own one-layer latent cache. Module k may only keep (commit) a position j once its input token
t_{j+k} is verified, so it trails the main cache by k - 1 positions; the positions after those are recomputed in
every step with the newest drafts (their cache columns are simply overwritten), and module k + 1 needs module k's
state at its last kept position, which `carry` remembers.
"""

from __future__ import annotations

import torch

from .cache import DecodeCache
from .compiled import DecodeForwards


class MTPDrafter:
    """Drafts `depth` tokens per slot with the model's first `depth` MTP modules (greedy drafts)."""

    def __init__(self, model, batch_size: int, max_len: int, depth: int | None = None,
                 forwards: DecodeForwards | None = None):
        available = len(model.model.mtp)
        if not available:
            raise ValueError("speculative decoding with MTP needs a model with num_nextn_predict_layers >= 1, "
                             "got a model without MTP modules")
        depth = available if depth is None else depth
        if not 1 <= depth <= available:
            raise ValueError(f"num_speculative_tokens={depth} is invalid: this model has {available} MTP module(s), "
                             f"expected 1 to {available}")
        self.model, self.depth = model, depth
        self.forwards = forwards or DecodeForwards(next(model.parameters()).device, compile=False)
        param = next(model.parameters())
        # A greedy step (greedy_step) computes every module up to the last draft's position: depth columns of room.
        self.caches = [DecodeCache.for_mtp(model, k, batch_size, max_len + depth, param.dtype, param.device)
                       for k in range(1, depth + 1)]
        self.fused = True  # greedy_step may be used (tests turn it off to run `draft` every step)
        # carry[k - 1][slot]: module k's output at its last kept position, the state module k + 1 starts from.
        # (its width: hidden_size, or DeepSeek-V4's hc_mult streams of it, flattened: model/v4_mtp.py)
        self.carry = torch.zeros(depth, batch_size, model.mtp_state_size, dtype=param.dtype, device=param.device)

    def reset(self, slot: int) -> None:
        """Empty a slot for a new sequence."""
        for cache in self.caches:
            cache.reset(slot)

    def draft(self, slots: list[int], hidden: torch.Tensor, kept: list[int], known: list[list[int]],
              eager: bool = False) -> list[list[int]]:
        """Bring every module up to date for each slot and return its `depth` greedy drafts (`eager`: never through
        the compiled forward, as after a prefill chunk).

        hidden [B, S, hidden] holds the main model's final-normed states at the positions its last forward kept (the
        first kept[i] columns of row i, ending at position P_i); known[i] is every verified token of the slot's
        sequence, at least through t_{P_i + 1} (more when the rest of a prompt is already known).
        """
        device = hidden.device
        last_pos = [self.caches[0].lengths[s] + n - 1 for s, n in zip(slots, kept)]  # P_i
        rows = range(len(slots))
        drafts: list[list[int]] = [[] for _ in rows]
        h_prev = [hidden[i, :n] for i, n in enumerate(kept)]  # module k-1's states from its first new position
        prev_start = [self.caches[0].lengths[s] for s in slots]
        carry = self.carry.clone()  # as the previous step left it: the loop below overwrites self.carry
        for k, cache in enumerate(self.caches, start=1):
            start = [cache.lengths[s] for s in slots]
            inputs, tokens = [], []
            for i, s in enumerate(slots):
                # Positions start..prev_start-1 (none or one) were module k-1's last kept ones: their states carry.
                carried = carry[k - 2, s, None].expand(prev_start[i] - start[i], -1) if k > 1 else h_prev[i][:0]
                inputs.append(torch.cat([carried, h_prev[i]]))
                ahead = [j + k for j in range(start[i], last_pos[i] + 1)]  # the index of each position's input token
                # t_{P+1+m} is known, or else drafted by module m (drafts[i][m - 1]).
                tokens.append([known[i][t] if t < len(known[i]) else drafts[i][t - last_pos[i] - 2] for t in ahead])
            n_new = [len(t) for t in tokens]
            width = max(n_new)
            step = cache.step(slots, n_new, width, batch=self.forwards.batch(len(slots)))
            pad_rows = step.slots.shape[0] - len(slots)
            h_in = torch.stack([torch.cat([x, x.new_zeros(width - len(x), x.shape[-1])]) for x in inputs]
                               + [hidden.new_zeros(width, hidden.shape[-1])] * pad_rows)
            ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens] + [[0] * width] * pad_rows, device=device)
            last = torch.tensor([n - 1 for n in n_new] + [0] * pad_rows, device=device)
            h, logits = self.forwards.mtp(self.model, k, h_in, ids, step, cache.tensors, last, eager)
            guesses = logits[: len(slots)].argmax(dim=-1).tolist()
            for i, s in enumerate(slots):
                # Keep the positions whose input token is verified; the rest are redone next step.
                keep = max(0, min(n_new[i], len(known[i]) - k - start[i]))
                cache.commit(s, keep)
                if keep and k < self.depth:
                    self.carry[k - 1, s] = h[i, keep - 1]
                drafts[i].append(guesses[i])
            h_prev = [h[i, : n_new[i]] for i in rows]
            prev_start = start
        return drafts

    def trails(self, slots: list[int], lengths: list[int]) -> bool:
        """Whether, for main-cache lengths L of the slots, each module k holds exactly L + 1 - k positions (as
        `draft` leaves it), which `greedy_step` starts from."""
        return all(cache.lengths[s] == n + 1 - k for k, cache in enumerate(self.caches, start=1)
                   for s, n in zip(slots, lengths))

    def greedy_step(self, cache: DecodeCache, slots: list[int], tokens: list[list[int]], batch: int | None = None,
                    full_length: bool = False) -> list[tuple[list[int], list[int]]]:
        """Verify each slot's newest token and drafts (tokens[i], 1 + depth of them) with the main model whose
        cache is `cache`, and draft the next ones, in one forward (`compiled.greedy_speculative_forward`) and one
        device synchronization. Greedy requests only; the module caches must `trail` the main cache.

        Commits the MTP caches (not the main one); returns per slot (the emitted tokens: the accepted drafts and
        the main model's next token, the new drafts)."""
        n, width = len(slots), self.depth + 1
        pad = (batch or n) - n
        ids = torch.tensor(tokens + [[0] * width] * pad, device=cache.device)
        step = cache.step(slots, [width] * n, width, batch=batch, full_length=full_length)
        mtp_steps = [c.step(slots, [self.depth + k] * n, self.depth + k, batch=batch, full_length=full_length)
                     for k, c in enumerate(self.caches, start=1)]
        best, accepted, drafts, carry = self.forwards.greedy_speculative(
            self.model, ids, step, cache.tensors, mtp_steps, [c.tensors for c in self.caches], self.carry)
        self.carry[:, step.slots[:n]] = carry[:, :n]
        results = []
        for s, row in zip(slots, torch.cat([best, accepted[:, None], drafts], dim=1)[:n].tolist()):
            c = row[width]
            for module_cache in self.caches:
                module_cache.commit(s, c + 1)
            results.append((row[: c + 1], row[width + 1:]))
        return results


def verify(probs: torch.Tensor, draft: int, generator: torch.Generator) -> tuple[bool, int]:
    """Speculative sampling with a deterministic (greedy) draft: accept it with probability p(draft), else sample
    from p with the draft removed. The token that results is distributed exactly as p [vocab]; for a greedy
    request (one-hot p) the draft is accepted iff it is the argmax.

    Returns (accepted, token).
    """
    p_draft = float(probs[draft])
    if p_draft >= 1.0 or (p_draft > 0 and torch.rand((), generator=generator).item() < p_draft):
        return True, draft
    residual = probs.clone()
    residual[draft] = 0.0
    if residual.max() >= residual.sum():  # one token left (covers greedy): no draw needed
        return False, int(residual.argmax())
    return False, int(torch.multinomial((residual / residual.sum()).cpu(), 1, generator=generator))
