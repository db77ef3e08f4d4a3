"""`analyze`: route held-out sources through a model (and optionally an earlier checkpoint of its run), run the
probes, and gather every number of the report into one JSON-ready dict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from . import modality, probes, specialization, statistics
from .capture import LayerRouting, RoutingCapture, main_moe_layers
from .sources import ImageChats, Source, batches


@dataclass
class RoutedText:
    """One pass over the sources: every layer's routing and, per token, its id, source and sequence position."""

    layers: list[LayerRouting]
    token_ids: torch.Tensor  # [N] long
    source: torch.Tensor  # [N] long: index of the token's source
    next_in_sequence: torch.Tensor  # [N] bool: token t+1 follows token t in the same sequence
    loss: float  # mean next-token cross-entropy


@torch.no_grad()
def route(model: nn.Module, sources: Sequence[Source | ImageChats], batch_size: int, progress: bool = False,
          desc: str = "routing") -> RoutedText:
    """Run every source through `model` batch_size sequences at a time, recording the routing (a vision-language
    model's pictures, of ImageChats sources, through its embedding path)."""
    device = next(model.parameters()).device
    ids_seen, source_of, follows = [], [], []
    total, count = 0.0, 0
    with RoutingCapture(model) as capture:
        for d, ids, inputs in tqdm(batches(sources, batch_size), desc=desc, unit="batch", disable=not progress,
                                   dynamic_ncols=True):
            B, S = ids.shape
            # a vision-language model's pictures go through its embedding path, in its placeholders' place
            out = model(ids.to(device), labels=ids.to(device), **{k: v.to(device) for k, v in inputs.items()})
            total += float(out.lm_loss) * B * (S - 1)
            count += B * (S - 1)
            ids_seen.append(ids.reshape(-1))
            source_of.append(torch.full((B * S,), d, dtype=torch.long))
            follows.append(torch.arange(S).repeat(B) < S - 1)
    return RoutedText(capture.layers(), torch.cat(ids_seen), torch.cat(source_of), torch.cat(follows),
                      total / max(count, 1))


@torch.no_grad()
def prompt_view(model: nn.Module, tokenizer, text: str) -> dict:
    """Each token of `text` with its text and, per MoE layer, its experts and weights (highest weight first)."""
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) < 1:
        raise ValueError("--prompt is empty")
    device = next(model.parameters()).device
    with RoutingCapture(model) as capture:
        model(torch.tensor([ids], device=device))
    layers = capture.layers()
    pieces = tokenizer.pieces(ids)
    tokens = []
    for t, token_id in enumerate(ids):
        per_layer = []
        for layer in layers:
            order = layer.weights[t].argsort(descending=True)
            per_layer.append({"layer": layer.layer, "experts": layer.indices[t][order].tolist(),
                              "weights": layer.weights[t][order].tolist()})
        text_t = pieces[t] if pieces[t] else tokenizer.token_text(token_id)
        tokens.append({"id": token_id, "text": text_t, "layers": per_layer})
    return {"text": text, "tokens": tokens}


def _token_texts(vocab: list[dict], tokenizer) -> None:
    for layer in vocab:
        for entries in layer["experts"]:
            for e in entries:
                e["text"] = tokenizer.token_text(e["token"])
        for e in layer["most_concentrated"] + layer["least_concentrated"]:
            e["text"] = tokenizer.token_text(e["token"])


def analyze(model: nn.Module, tokenizer, sources: Sequence[Source], batch_size: int = 8, prompt: str | None = None,
            compare: nn.Module | None = None, compare_name: str | None = None, probe_tokens: int | None = None,
            top_tokens: int = 8, min_count: int = 5, progress: bool = False,
            modality_token_id: int | None = None) -> dict:
    """Every statistic of the report, as a dict of plain numbers, lists and strings (the JSON file). Routing per
    modality (`modality`) is reported when `modality_token_id` is given, or when the data holds the model's image
    placeholder token (config.media_placeholder_token_id; a vision-language model's image token)."""
    # a vision-language model's routers are its language model's
    config = getattr(model.config, "text_config", model.config)
    E, k = config.n_routed_experts, config.num_experts_per_tok
    routed = route(model, sources, batch_size, progress)
    # "hash": the layer's experts come from a fixed token table (DeepSeek-V4's hash_moe layers), "learned": a router
    kinds = {i: "learned" if moe.gate.ranks_experts else "hash" for i, moe in main_moe_layers(model)}
    results: dict = {
        "model": {"n_routed_experts": E, "num_experts_per_tok": k, "n_shared_experts": config.n_shared_experts,
                  "moe_layers": [layer.layer for layer in routed.layers], "topk_method": config.topk_method,
                  "scoring_func": config.scoring_func, "n_group": config.n_group, "topk_group": config.topk_group,
                  "routing": [kinds[layer.layer] for layer in routed.layers]},
        "sources": [{"name": s.name, "sequences": s.shape[0], "seq_len": s.shape[1], "tokens": s.tokens}
                    for s in sources],
        "definitions": {**statistics.DEFINITIONS, **specialization.DEFINITIONS, **modality.DEFINITIONS,
                        **probes.DEFINITIONS},
        "loss": routed.loss,
        "layers": [{**statistics.layer_statistics(layer, routed.next_in_sequence, E), "routing": kinds[layer.layer]}
                   for layer in routed.layers],
        "domain": [{"layer": layer.layer, **specialization.domain_specialization(layer, routed.source, len(sources), E)}
                   for layer in routed.layers],
        "vocabulary": [{"layer": layer.layer, **specialization.vocabulary_specialization(
            layer, routed.token_ids, E, top_tokens, min_count)} for layer in routed.layers],
    }
    _token_texts(results["vocabulary"], tokenizer)
    image_id = model.config.media_placeholder_token_id if modality_token_id is None else modality_token_id
    if image_id is not None and (modality_token_id is not None or bool((routed.token_ids == image_id).any())):
        results["modality"] = modality.modality_report(
            routed.layers, routed.token_ids, image_id, E, config.modality_expert_groups,
            config.n_group, source="config" if modality_token_id is None else "--modality-token-id")
    if prompt:
        results["prompt"] = prompt_view(model, tokenizer, prompt)
    if compare is not None:
        earlier = route(compare, sources, batch_size, progress, desc="routing (compared)")
        compare_experts = getattr(compare.config, "text_config", compare.config).n_routed_experts
        if len(earlier.layers) != len(routed.layers) or compare_experts != E:
            raise ValueError(f"--compare {compare_name}: {len(earlier.layers)} MoE layers of "
                             f"{compare_experts} experts, the model has {len(routed.layers)} of {E}: "
                             f"expected an earlier checkpoint of the same run")
        per_layer = [statistics.saturation(a, b, E) for a, b in zip(earlier.layers, routed.layers)]
        results["saturation"] = {"checkpoint": compare_name, "loss": earlier.loss, "per_layer": per_layer,
                                 "mean": sum(per_layer) / len(per_layer)}
    if probe_tokens != 0:
        probe_sources = [s.head(probe_tokens) for s in sources] if probe_tokens else list(sources)
        results["probes"] = {"tokens": sum(s.tokens for s in probe_sources),
                             **probes.ablation_probes(model, probe_sources, batch_size, progress)}
    return results
