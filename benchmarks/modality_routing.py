"""Modality-aware routing (`modality_expert_groups`) against one shared routing, on a synthetic two-modality task a
text model can learn without a vision tower: the same tiny MoE trained twice, same seed, data and steps, once with
every token choosing among all experts and once with image tokens limited to the image groups' experts and text
tokens to the text groups'; then answer accuracy, validation loss (of the answers), and per modality MaxVio, the
Jensen-Shannon divergence of the image and text loads and the experts each modality has to itself.

    OMP_NUM_THREADS=1 python benchmarks/modality_routing.py              # 800 steps a model: ~2 min each here
    OMP_NUM_THREADS=1 python benchmarks/modality_routing.py --steps 3000 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/modality_routing.py --quick      # smoke run

The task (seekmoe.vision_demo_data): a 3 x 3 scene holds 1-4 objects, each a colour (4) and a shape (3); a question
asks how many objects of a colour or a shape there are, what is at a position, or what colour the one circle is, and
the answer is one word. Question types are drawn alike, and half the position questions ask about an occupied cell, so
that answering without looking scores little ("blind accuracy", printed first: the most frequent answer to each
question). A sequence is <bos>, the 9 cells as "image tokens", the question's words, "?", the answer.
Each image token id (one per colour x shape, one for an empty cell) stands for the image features a vision tower
would put in a placeholder token's place: the model embeds it like any token, and its routers see it as
`media_placeholder_token_id` (a pre-hook on each router maps the image id range there), which is how a
vision-language model's image tokens reach the router. Only the answer is trained on (the loss of a
vision-language SFT, where neither image nor question tokens are targets).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, pyplot, save_figure, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe import ModelConfig  # noqa: E402
from seekmoe.analysis import LayerRouting, route  # noqa: E402
from seekmoe.analysis.modality import modality_report  # noqa: E402
from seekmoe.analysis.sources import Source  # noqa: E402
from seekmoe.train.balance import update_router_biases  # noqa: E402
from seekmoe.vision_demo_data import (COLOURS, NOTHING, NUMBERS, SHAPES, balanced_questions,  # noqa: E402
                                     question_kind, questions, random_scene)

BOS, EOS, PLACEHOLDER, ASK = 0, 1, 2, 3  # ASK: the "?" after which the answer comes
CELLS = 9
QUESTION_WORDS = 6  # the longest question has 6 words
SEQ_LEN = 1 + CELLS + QUESTION_WORDS + 2


class Vocabulary:
    """Token ids: specials, then every word of the questions and answers, then one image token per cell content."""

    def __init__(self):
        words = sorted({w for q, _ in _all_questions() for w in q.split()}
                       | set(NUMBERS) | set(COLOURS) | set(SHAPES) | {NOTHING})
        self.word = {w: 4 + i for i, w in enumerate(words)}
        self.image_base = 4 + len(words)
        contents = [None] + [(c, s) for c in COLOURS for s in SHAPES]
        self.image = {content: self.image_base + i for i, content in enumerate(contents)}
        self.size = self.image_base + len(contents)


def _all_questions() -> list[tuple[str, str]]:
    """Questions about 20 scenes: every scene is asked about every colour, shape and position, so every word of
    every template occurs."""
    rng = random.Random(1)
    return [pair for _ in range(20) for pair in questions(random_scene(rng, 3, 1, 4))]


def make_examples(vocab: Vocabulary, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """n (sequence [n, SEQ_LEN], answer position [n], answer id [n], question type) examples, one question a scene."""
    rng = random.Random(seed)
    ids = torch.full((n, SEQ_LEN), EOS, dtype=torch.long)
    where, answer, kinds = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), []
    for i in range(n):
        scene = random_scene(rng, 3, 1, 4)
        (q, a), = balanced_questions(scene, rng, 1)
        row = [BOS] + [vocab.image[c] for c in scene.cells] + [vocab.word[w] for w in q.split()] + [ASK]
        ids[i, :len(row)] = torch.tensor(row)
        ids[i, len(row)] = vocab.word[a]
        where[i], answer[i] = len(row), vocab.word[a]
        kinds.append(question_kind(q))
    return ids, where, answer, kinds


def build(vocab: Vocabulary, modality: bool, seed: int) -> seekmoe.CausalLM:
    """A tiny 2-MoE-layer model (8 experts in 4 groups, k=2, one shared expert); `modality`: image groups 0-1."""
    groups = {"image": [0, 1], "text": [2, 3]} if modality else None
    config = ModelConfig.preset("tiny", vocab_size=vocab.size, first_k_dense_replace=0, max_position_embeddings=32,
                                num_nextn_predict_layers=0, bias_update_speed=0.01, q_lora_rank=None,
                                media_placeholder_token_id=PLACEHOLDER, modality_expert_groups=groups)
    torch.manual_seed(seed)
    model = seekmoe.build_model(config)
    image_base = vocab.image_base

    def as_placeholder(gate, args):  # the router sees image tokens as the placeholder a vision-language model has
        hidden, token_ids = args
        return hidden, torch.where(token_ids >= image_base, torch.full_like(token_ids, PLACEHOLDER), token_ids)

    for moe in model.moe_layers():
        moe.gate.register_forward_pre_hook(as_placeholder)
    return model


def blind_accuracy(val, vocab: Vocabulary) -> float:
    """The accuracy of answering each validation question with its most frequent answer (over the validation set
    itself): the best a model that ignores the image can do."""
    ids, where, answer, _ = val
    best: dict[tuple, dict[int, int]] = {}
    for row, w, a in zip(ids.tolist(), where.tolist(), answer.tolist()):
        tally = best.setdefault(tuple(row[1 + CELLS:w]), {})
        tally[a] = tally.get(a, 0) + 1
    return sum(max(t.values()) for t in best.values()) / ids.shape[0]


def answer_labels(ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Labels that train the answer only: -100 everywhere else."""
    labels = torch.full_like(ids, -100)
    rows = torch.arange(ids.shape[0])
    labels[rows, where] = ids[rows, where]
    return labels


@torch.no_grad()
def evaluate(model, vocab: Vocabulary, val) -> dict:
    """Answer accuracy (overall and per question type), answer loss, and the routing per modality."""
    ids, where, answer, kinds = val
    model.eval()
    logits = model(ids).logits[torch.arange(ids.shape[0]), where - 1]  # [n, vocab] at the "?"
    loss = float(torch.nn.functional.cross_entropy(logits.float(), answer))
    right = logits.argmax(-1) == answer
    per_kind = {k: float(right[[i for i, kk in enumerate(kinds) if kk == k]].double().mean())
                for k in sorted(set(kinds))}
    routed = route(model, [Source("val", ids)], batch_size=256)
    token_ids = torch.where(routed.token_ids >= vocab.image_base, PLACEHOLDER, routed.token_ids)
    # leave out the padding after each answer
    real = torch.arange(SEQ_LEN).repeat(ids.shape[0]) <= where.repeat_interleave(SEQ_LEN)
    layers = [LayerRouting(layer.layer, layer.indices[real], layer.weights[real], layer.entropy[real], 0,
                          layer.shared_norm[real], layer.routed_norm[real]) for layer in routed.layers]
    report = modality_report(layers, token_ids[real], PLACEHOLDER, model.config.n_routed_experts,
                             model.config.modality_expert_groups, model.config.n_group)
    model.train()
    return {"accuracy": float(right.double().mean()), "accuracy_by_type": per_kind, "loss": loss,
            "modality": report}


def train_one(vocab: Vocabulary, modality: bool, seed: int, steps: int, batch: int, lr: float, val) -> dict:
    model = build(vocab, modality, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen_seed = 1000 + seed  # the same training examples for both routings
    started, curve = time.perf_counter(), []
    for step in range(1, steps + 1):
        ids, where, _, _ = make_examples(vocab, batch, gen_seed * 100003 + step)
        out = model(ids, labels=answer_labels(ids, where))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        update_router_biases(model.moe_layers(), out.expert_counts, model.config.bias_update_speed)
        if step % max(steps // 5, 1) == 0 or step == steps:
            curve.append({"step": step, "train_answer_loss": out.lm_loss.item(), **{
                k: v for k, v in evaluate(model, vocab, val).items() if k in ("accuracy", "loss")}})
            print(f"  {'modality' if modality else 'shared'} seed {seed} step {step}: answer loss "
                  f"{curve[-1]['train_answer_loss']:.3f}, val accuracy {curve[-1]['accuracy']:.3f}", flush=True)
    result = evaluate(model, vocab, val)
    return {"routing": "modality" if modality else "shared", "seed": seed, "seconds": time.perf_counter() - started,
            "curve": curve, **result}


def summary_rows(runs: list[dict]) -> list[list[str]]:
    rows = [["routing", "seed", "accuracy", "count / position / colour", "val loss", "MaxVio image", "MaxVio text",
             "JS image-text", "image-only / text-only experts", "shared share image / text"]]
    for r in runs:
        m = r["modality"]["layers"]
        by = r["accuracy_by_type"]
        vio_i = sum(layer["max_vio"]["image"] for layer in m) / len(m)
        vio_t = sum(layer["max_vio"]["text"] for layer in m) / len(m)
        own = "/".join(f"{sum(layer['specialized_experts'][x] for layer in m)}" for x in ("image", "text"))
        sh = "/".join(f"{100 * sum(layer['shared_norm_share'][x] for layer in m) / len(m):.0f}%"
                      for x in ("image", "text"))
        rows.append([r["routing"], str(r["seed"]), f"{r['accuracy']:.3f}",
                     " / ".join(f"{by.get(k, 0):.2f}" for k in ("count", "position", "colour")), f"{r['loss']:.3f}",
                     f"{vio_i:.3f}", f"{vio_t:.3f}", f"{r['modality']['js_divergence_mean']:.3f}", own, sh])
    return rows


def plot(runs: list[dict], path: Path) -> None:
    """Each routing's per-expert load from image and from text tokens (last MoE layer, first seed)."""
    plt = pyplot()
    if plt is None:
        return
    firsts = {r["routing"]: r for r in reversed(runs)}
    fig, axes = plt.subplots(1, len(firsts), figsize=(5 * len(firsts), 3), sharey=True)
    for ax, (name, r) in zip(list(axes) if len(firsts) > 1 else [axes], sorted(firsts.items(), reverse=True)):
        layer = r["modality"]["layers"][-1]
        E = len(layer["load"]["image"])
        xs = torch.arange(E).double()
        ax.bar(xs - 0.2, layer["load"]["image"], 0.4, label="image tokens", color="#e4572e")
        ax.bar(xs + 0.2, layer["load"]["text"], 0.4, label="text tokens", color="#4c78a8")
        ax.set_title(f"{name} routing: JS {layer['js_divergence']:.2f}, accuracy {r['accuracy']:.2f}")
        ax.set_xlabel(f"expert (layer {layer['layer']})")
        ax.set_xticks(range(E))
    axes_list = list(axes) if len(firsts) > 1 else [axes]
    axes_list[0].set_ylabel("share of the modality's slots")
    axes_list[0].legend()
    print(f"wrote {save_figure(fig, path)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--routing", choices=("both", "shared", "modality"), default="both",
                   help="train both routings (default) or one")
    p.add_argument("--val", type=int, default=1000, help="validation questions (fixed scenes)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 30 steps, 200 validation questions")
    p.add_argument("--out", default=str(RESULTS / "modality_routing.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.val = 30, 200
    print(header(f"modality_routing: shared vs modality-aware routing, {args.steps} steps of {args.batch} questions, "
                 f"seeds {args.seeds}"))
    vocab = Vocabulary()
    val = make_examples(vocab, args.val, seed=7)
    blind = blind_accuracy(val, vocab)
    print(f"vocabulary {vocab.size} tokens ({vocab.size - vocab.image_base} image tokens); blind accuracy (the most "
          f"frequent answer to each question, image ignored) {blind:.3f}")
    runs = []
    for seed in args.seeds:
        for modality in {"both": (False, True), "shared": (False,), "modality": (True,)}[args.routing]:
            runs.append(train_one(vocab, modality, seed, args.steps, args.batch, args.lr, val))
    print()
    print(table(summary_rows(runs)))
    out = Path(args.out)
    write_json(out, {"args": vars(args), "vocab_size": vocab.size, "blind_accuracy": blind, "runs": runs})
    plot(runs, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
