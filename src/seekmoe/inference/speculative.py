"""Self-speculative decoding with MTP: the first MTP module drafts the next token, the main model verifies it.

At position i the depth-1 MTP module combines the main model's final hidden state h_i with Emb(t_{i+1}) and
predicts t_{i+2}, so after each verifying forward it drafts the token after the one just sampled. The main model
then scores [t_n, draft] in one forward: its prediction at t_n decides whether the draft is accepted, and if so its
prediction at the draft is a second new token for the same forward.
"""

from __future__ import annotations

import torch

from .cache import LatentCache


class MTPDrafter:
    """Runs the depth-1 MTP module over its own latent cache (one layer) and proposes one draft token a slot."""

    def __init__(self, model, batch_size: int, max_len: int):
        if not model.model.mtp:
            raise ValueError("speculative decoding with MTP needs a model with num_nextn_predict_layers >= 1, "
                             "got a model without MTP modules")
        self.model = model
        self.mtp = model.model.mtp[0]
        param = next(model.parameters())
        self.cache = LatentCache.for_model(model.config, 1, batch_size, max_len, param.dtype, param.device)

    def reset(self, slot: int) -> None:
        self.cache.reset(slot)

    def draft(self, slots: list[int], hidden: torch.Tensor, next_ids: list[list[int]]) -> list[int]:
        """Extend each slot's MTP cache by len(next_ids[i]) positions and return the greedy draft at the last one.

        hidden [B, S, hidden] holds the main model's final-normed states at those positions; next_ids[i] the
        tokens that follow them (the token after position j is the MTP module's input at j).
        """
        body = self.model.model
        n_new = [len(ids) for ids in next_ids]
        width = max(n_new)
        padded = torch.tensor([ids + [0] * (width - len(ids)) for ids in next_ids], device=hidden.device)
        step = self.cache.step(slots, n_new, width)
        cos, sin = body.rotary_emb(step.positions)
        h, _ = self.mtp(hidden[:, :width], body.embed_tokens(padded), cos, sin, step.attn_mask, step.layers[0])
        last = h[torch.arange(len(slots)), torch.tensor(n_new) - 1]  # [B, hidden]
        logits = self.model.lm_head(self.mtp.shared_head["norm"](last))
        for s, n in zip(slots, n_new):
            self.cache.commit(s, n)
        return logits.argmax(dim=-1).tolist()


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
