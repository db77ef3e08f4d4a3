"""The DeepSeek-MoE causal language model: embeddings, decoder blocks, final norm, LM head, and MTP modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import CacheLayer
from .block_choice import build_block, build_rotary, build_streams
from .experts import RoutedExperts
from .hyper_connections import HyperConnection, HyperHead
from .moe import BalanceWindow, MoE, MoEStats, batch_balance_loss
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .routing import Router
from .v4_attention import V4Attention
from .v4_compressor import Compressor
from .v4_mtp import V4MTPModule
from .v4_rope import V4RotaryEmbedding


@dataclass
class CausalLMOutput:
    """logits [B, S, vocab]; with labels, the loss and its parts; per-MoE-layer expert token counts."""

    logits: torch.Tensor
    # What the MTP modules start from: [B, S, hidden] after the final norm; DeepSeek-V4's residual streams before
    # their collapse, flattened [B, S, hc_mult * hidden] (v4_mtp.py)
    hidden_states: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + balance_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over the MTP depths of their cross-entropies (unweighted)
    balance_loss: torch.Tensor | None = None  # already weighted by the configured alphas
    expert_counts: torch.Tensor | None = None  # [n MoE layers (main, then MTP), E] tokens per expert


class DeepseekModel(nn.Module):
    """The body: token embedding, decoder blocks (the config's kind, block_choice.py), final RMSNorm, and the MTP
    modules (kept here so parameter names match the `model.` prefix of DeepSeek checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary = build_rotary(config)
        self.layers = nn.ModuleList(build_block(config, i, rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # (registered after the norm: the parameter order optimizer states and checkpoints of earlier runs follow)
        depths = range(1, config.num_nextn_predict_layers + 1)
        self.mtp = nn.ModuleList(V4MTPModule(config, k, rotary) if config.is_v4 else MTPModule(config, k)
                                 for k in depths)  # V4: v4_mtp.py, the release's module over the streams
        self.rotary_emb = rotary
        # How the residual stream enters and leaves the blocks (`hc_head`: DeepSeek-V4's checkpoint name for the
        # final collapse of its hyper-connection streams; no parameters for the other families)
        self.hc_head = build_streams(config)


class CausalLM(nn.Module):
    """DeepSeek-V2/V3-style MoE causal LM. `model(input_ids, labels=input_ids)` trains it (labels are shifted
    inside, -100 ignored); `model(input_ids).logits` scores it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for router biases."""
        for module in self.modules():
            init_module(module, self.config.initializer_range)

    @property
    def supports_packed_masks(self) -> bool:
        """Whether a block-diagonal `attn_mask` keeps packed examples apart in this model (not DeepSeek-V4's: its
        compressed keys span whole windows of the row; attention_choice.supports_packed_masks)."""
        from .attention_choice import supports_packed_masks

        return supports_packed_masks(self.config)

    @property
    def mtp_state_size(self) -> int:
        """The width of the state passed between MTP depths (`hidden_states`): hidden_size, or DeepSeek-V4's
        hc_mult streams of it."""
        return self.config.hidden_size * (self.config.hc_mult if self.config.is_v4 else 1)

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main blocks first, then MTP modules: the order of `expert_counts` rows."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: list[CacheLayer] | None = None, mtp: bool | None = None,
                balance_window: BalanceWindow | None = None, mtp_loss_weight: float | None = None,
                inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, S]; labels [B, S] (usually input_ids); position_ids [S] or [B, S]; attn_mask, if given,
        a boolean [B, 1, S, S] (True = may attend) replacing the causal mask.

        For decoding, `cache` holds one cache layer per decoder layer (inference/cache.py): input_ids are then only the new tokens,
        position_ids their positions and attn_mask [B, 1, S, T] which cached tokens each may attend to.

        With labels, the MTP modules run (and `mtp_loss` is reported) when `mtp` says so, by default in training
        mode only: the validation loss needs no MTP. `balance_window` makes the expert- and device-level balance
        losses count over a whole optimizer step's micro-batches (see `BalanceWindow`). `mtp_loss_weight` is the
        lambda of the MTP loss in `loss` (None = config.mtp_loss_weight); a trainer's schedule passes it here.

        `inputs_embeds` [B, S, hidden], if given, replaces the token embeddings (a vision-language model puts image
        features at its placeholder tokens); input_ids, when given with it, still reach the routers (hash routing
        reads them) and the MTP modules."""
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or (input_ids is not None and input_ids.shape != inputs_embeds.shape[:2]):
                raise ValueError(f"inputs_embeds must be [batch, seq, hidden] matching input_ids, got shape "
                                 f"{tuple(inputs_embeds.shape)}")
            h = inputs_embeds
        elif input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be [batch, seq], got {shape}")
        else:
            h = self.model.embed_tokens(input_ids)
        B, S = h.shape[:2]
        body = self.model
        if position_ids is None:
            position_ids = torch.arange(S, device=h.device)
        cos, sin = body.rotary_emb(position_ids)
        h = body.hc_head.expand(h)
        stats: list[MoEStats] = []
        for i, layer in enumerate(body.layers):
            h, s = layer(h, cos, sin, attn_mask, None if cache is None else cache[i], input_ids)
            if s is not None:
                stats.append(s)
        if self.config.is_v4:  # V4: the MTP modules start from the streams before their collapse
            mtp_states = h.flatten(2)
            h = body.norm(body.hc_head(h))
        else:
            h = mtp_states = body.norm(body.hc_head(h))
        logits = self.lm_head(h)
        out = CausalLMOutput(logits=logits, hidden_states=mtp_states)
        if labels is None:
            return out

        out.lm_loss = _next_token_loss(logits, labels)
        out.loss = out.lm_loss
        if mtp is None:
            mtp = self.training
        if mtp and body.mtp and input_ids is not None and S > 1 + len(body.mtp):
            out.mtp_loss = self._mtp_loss(input_ids, labels, mtp_states, cos, sin, stats, attn_mask, inputs_embeds)
            lam = self.config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
            out.loss = out.loss + lam * out.mtp_loss
        if stats:
            out.balance_loss = torch.stack([s.balance_loss for s in stats]).sum()
            batch_loss = batch_balance_loss(stats, self.config, B * S, balance_window)
            if batch_loss is not None:
                out.balance_loss = out.balance_loss + batch_loss
            out.loss = out.loss + out.balance_loss
            out.expert_counts = torch.stack([s.expert_counts for s in stats])
        return out

    def _mtp_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, stats: list[MoEStats], attn_mask: torch.Tensor | None = None,
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over depths k = 1..D of the cross-entropy of predicting token i+k+1 at position i (under the main
        forward's attn_mask, when it has one: packed examples stay apart in the MTP modules too). With
        `inputs_embeds`, the MTP modules take the tokens ahead as the main forward embedded them (image features)."""
        S = input_ids.shape[1]
        losses = []
        for k in range(1, len(self.model.mtp) + 1):
            n = S - k  # positions i that have an input token t_{i+k}
            mask = None if attn_mask is None else attn_mask[..., :n, :n]
            ahead = None if inputs_embeds is None else inputs_embeds[:, k:]
            h, s = self.mtp_forward(k, h[:, :n], input_ids[:, k:], cos[..., :n, :, :], sin[..., :n, :, :], mask,
                                    token_embeds=ahead)
            if s is not None:
                stats.append(s)
            losses.append(_next_token_loss(self.mtp_logits(k, h), labels[:, k:]))
        return torch.stack(losses).mean()

    def mtp_forward(self, depth: int, h_prev: torch.Tensor, tokens: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: CacheLayer | None = None,
                    token_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """MTP module `depth` (1-based) over h_prev [B, S, mtp_state_size] (the previous depth's states) and the
        tokens `depth` ahead [B, S]: (h [B, S, mtp_state_size], its MoE stats). The one MTP forward of training
        (`_mtp_loss`) and of drafting while decoding (inference/compiled.py, with `cache`)."""
        mtp = self.model.mtp[depth - 1]
        embeds = self.model.embed_tokens(tokens) if token_embeds is None else token_embeds
        return mtp(h_prev, embeds, cos, sin, attn_mask, cache, tokens)

    def mtp_logits(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        """MTP module `depth`'s predictions from its states h [..., mtp_state_size]: the shared LM head after its own
        norm (V4: after its own collapse of the streams too)."""
        return self.lm_head(self.model.mtp[depth - 1].shared_head["norm"](h))

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors in the Hugging Face DeepSeek layout (per-expert keys)."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, i] against labels[:, i + 1] (fp32), ignoring -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def init_module(module: nn.Module, std: float) -> bool:
    """Give `module`'s own parameters and buffers (not its children's) their initial values: normal(0, std) for
    matrices, ones for norms, zeros for router biases. False for a module this table does not know: it has no
    tensors of its own to set. parallel/materialize.py calls it module by module to initialize shards."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std)
        if getattr(module, "bias", None) is not None:  # attention_bias: zero, as transformers initializes them
            module.bias.zero_()
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)
    elif isinstance(module, nn.LayerNorm):  # V3.2's indexer key norm
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, Router):  # every router initializes its own parameters
        module.reset_parameters(std)
    elif isinstance(module, RoutedExperts):
        module.gate_up_proj.normal_(0.0, std)
        module.down_proj.normal_(0.0, std)
    elif isinstance(module, (RotaryEmbedding, V4RotaryEmbedding)):
        module.reset_parameters()
    elif isinstance(module, (HyperConnection, HyperHead, Compressor, V4Attention)):  # DeepSeek-V4's own tensors
        module.reset_parameters(std)
    else:
        return False
    return True
