"""Supervised fine-tuning data: JSONL chats and prompt/completion pairs, rendered with the chat template, labelled
only on what the assistant says, and packed several examples a sequence without attention across examples.

Two record shapes, one a line (the shapes TRL and OpenAI use):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: every assistant turn is trained;
- `{"prompt": "...", "completion": "..."}`: the prompt is one user turn (or `prompt` is itself a list of messages).
Rendering is `chat_template.format_chat`, the template `seekmoe chat` and the saved tokenizer_config.json use: the
prompt ends with "Assistant:", the completion is " " + content followed by the end-of-text token (what ends a turn).

Packing: examples are laid end to end in rows of `seq_len` tokens. Each row carries `position_ids` that restart at
0 for every example and a block-diagonal causal `attn_mask`, so a packed example computes exactly what it computes
alone (tested); the MoE layers are dropless, so routing is per token and unaffected too. A model whose attention
cannot respect such a mask (DeepSeek-V4: `CausalLM.supports_packed_masks`) gets one example a row instead, padded
at its end, under the plain causal mask (no `attn_mask`): the padding comes after every trained token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import SequenceOrder
from ..inference.chat_template import format_chat
from ..inference.tokenizer import Tokenizer
from ..train.config import TrainConfig

IGNORE = -100  # label of a token that is not trained (cross_entropy's ignore_index)


@dataclass
class SFTExample:
    """One rendered example: token ids and their labels (IGNORE on prompt tokens, the id itself on trained ones)."""

    ids: list[int]
    labels: list[int]


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped); ValueError naming a bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    records = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                                 f"expected UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({str(e)[:200]}): expected one JSON object a line") \
                    from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n} is {type(record).__name__}: expected a JSON object")
            try:  # a "\ud800" escape is valid JSON but no character: the tokenizer cannot take it
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{path}:{n} holds a lone surrogate {e.object[e.start]!r}: expected text of whole "
                                 f"Unicode characters (a surrogate pair, or the character itself)") from None
            records.append(record)
    return records


def record_messages(record: dict) -> list[dict]:
    """The chat a record stands for: its `messages`, or its prompt (a string or messages) and the completion as
    the assistant's turn."""
    if "messages" in record:
        return record["messages"]
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if isinstance(completion, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
            return list(messages) + completion
        return list(messages) + [{"role": "assistant", "content": completion}]
    raise ValueError(f"record {str(record)[:80]!r} is invalid: expected a 'messages' list or 'prompt' and "
                     f"'completion' fields")


def render_example(record: dict, tokenizer: Tokenizer) -> SFTExample:
    """Tokenize a record through the chat template; only the assistant turns (and the end-of-text after each) are
    labelled. Each prompt is tokenized as `seekmoe chat` tokenizes it, ending at "Assistant:", so the trained
    completion starts at the token boundary generation starts from."""
    messages = record_messages(record)
    format_chat(messages)  # validates roles and contents
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"record {str(record)[:80]!r} has no assistant turn: nothing to train on")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = format_chat(messages[:i]) if i else None
        if prompt is None:
            raise ValueError(f"record {str(record)[:80]!r} starts with an assistant turn: expected a prompt first")
        piece = prompt[len(rendered):]
        piece_ids = tokenizer.encode(piece, add_bos=not rendered)
        completion_ids = tokenizer.encode(" " + m["content"], add_bos=False) + [tokenizer.eos_token_id]
        ids += piece_ids + completion_ids
        labels += [IGNORE] * len(piece_ids) + completion_ids
        rendered = prompt + " " + m["content"]
    return SFTExample(ids, labels)


@dataclass
class PackedBatch:
    """Packed rows: input_ids, labels, position_ids [B, S] and attn_mask [B, 1, S, S] (True = may attend; None: one
    example a row, the plain causal mask)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attn_mask: torch.Tensor | None

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(*(None if t is None else t.to(device, non_blocking=True) for t in
                             (self.input_ids, self.labels, self.position_ids, self.attn_mask)))


def pack_examples(examples: list[SFTExample], seq_len: int, packed: bool = True) -> list[list[SFTExample]]:
    """Rows of examples whose lengths sum to at most seq_len, filled in order (next-fit); one example a row unless
    `packed`."""
    if not packed:
        return [[ex] for ex in examples]
    rows: list[list[SFTExample]] = []
    used = seq_len
    for ex in examples:
        if used + len(ex.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.ids)
    return rows


def collate(rows: list[list[SFTExample]], seq_len: int, pad_id: int, packed: bool = True) -> PackedBatch:
    """The PackedBatch of packed rows, padded to seq_len: a padding token attends only to itself and is never
    trained. Unless `packed` (rows of one example each), no attn_mask: the plain causal mask."""
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    segment = torch.arange(seq_len).repeat(B, 1) + seq_len  # [B, S] each padding token its own segment
    for b, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row):
            n = len(ex.ids)
            ids[b, start:start + n] = torch.tensor(ex.ids)
            labels[b, start:start + n] = torch.tensor(ex.labels)
            positions[b, start:start + n] = torch.arange(n)
            segment[b, start:start + n] = k
            start += n
    if not packed:
        if any(len(row) > 1 for row in rows):
            raise ValueError("collate(packed=False) takes rows of one example each")
        return PackedBatch(ids, labels, positions, None)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # [B, S, S]
    return PackedBatch(ids, labels, positions, mask[:, None])


class SFTData:
    """SFT examples from JSONL files, packed into rows of `config.seq_len` tokens, visited in a resumable shuffled
    order; it stands in for TrainData in the Trainer (`make_data`). As in TrainData, each step takes one global
    batch of batch_size x grad_accum x dp_size rows, data-parallel rank r getting micro-batches r, r + dp_size, ...

    A share `config.val_fraction` of the examples (at least one, when there are 20 or more) is held out, chosen by
    the seed, for the validation loss. Examples longer than seq_len are dropped, and counted in `meta`.
    """

    def __init__(self, paths: list[str | Path], tokenizer: Tokenizer, config: TrainConfig, hf_tokenizer=None,
                 dp_rank: int = 0, dp_size: int = 1, render=None, packed: bool = True):
        """`render(record)` makes an SFTExample of a record (default: render_example through `tokenizer`);
        `packed=False` gives one example a row (a model without `supports_packed_masks`)."""
        self.config = config
        self.packed = packed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tokenizer = hf_tokenizer  # what the checkpoints and final/ save
        self.pad_id = tokenizer.eos_token_id
        records = [r for p in paths for r in read_jsonl(p)]
        if not records:
            raise ValueError(f"--data {' '.join(map(str, paths))}: no records: expected JSONL of chats or "
                             f"prompt/completion pairs")
        render = render or (lambda record: render_example(record, tokenizer))
        examples = [render(r) for r in records]
        kept = [e for e in examples if len(e.ids) <= config.seq_len]
        if not kept:
            longest = max(len(e.ids) for e in examples)
            raise ValueError(f"every example is longer than seq_len={config.seq_len} tokens (the shortest has "
                             f"{min(len(e.ids) for e in examples)}, the longest {longest}): raise seq_len")
        random.Random(config.seed).shuffle(kept)
        n_val = max(1, round(len(kept) * config.val_fraction)) if len(kept) >= 20 and config.val_fraction > 0 else 0
        val, train = kept[:n_val], kept[n_val:]
        self.train = pack_examples(train, config.seq_len, packed)
        self.val = pack_examples(val, config.seq_len, packed) if val else []
        self.order = SequenceOrder(len(self.train), config.seed)
        self.meta = {"files": [str(p) for p in paths], "examples": len(train), "val_examples": len(val),
                     "dropped_too_long": len(examples) - len(kept), "packed_rows": len(self.train),
                     "trained_tokens": sum(sum(t != IGNORE for t in e.labels) for e in train)}

    def describe(self) -> str:
        """For the trainer's start-up line."""
        dropped = self.meta["dropped_too_long"]
        how = "packed into" if self.packed else "one a row (this model's attention cannot keep packed examples apart) in"
        return (f"{self.meta['examples']:,} SFT examples {how} {len(self.train):,} sequences of "
                f"{self.config.seq_len} tokens" + (f" ({dropped} longer than seq_len dropped)" if dropped else ""))

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one step's rows over every rank, padding included."""
        c = self.config
        return c.batch_size * c.grad_accum * self.dp_size * c.seq_len

    def next_micro_batches(self) -> list[PackedBatch]:
        """This rank's `grad_accum` micro-batches of `batch_size` packed rows of the next global batch."""
        c = self.config
        ids = self.order.take(c.batch_size * c.grad_accum * self.dp_size)
        picks = [ids[(m * self.dp_size + self.dp_rank) * c.batch_size:][:c.batch_size] for m in range(c.grad_accum)]
        return [self.collate([self.train[i] for i in pick]) for pick in picks]

    def val_batches(self) -> list[tuple[PackedBatch, bool]]:
        """The held-out rows, a micro-batch at a time (at most eval_batches of them; every rank scores them all)."""
        c = self.config
        rows = self.val[:c.eval_batches * c.batch_size]
        return [(self.collate(rows[s:s + c.batch_size]), True) for s in range(0, len(rows), c.batch_size)]

    def collate(self, rows: list[list[SFTExample]]) -> PackedBatch:
        """One micro-batch of packed rows (vision/sft.py's data adds the rows' images)."""
        return collate(rows, self.config.seq_len, self.pad_id, self.packed)

    def state_dict(self) -> dict:
        """The position in the data."""
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position `state_dict` returned."""
        self.order.load_state_dict(state)


def sft_forward(model, batch: PackedBatch, device: torch.device, window, mtp_loss_weight: float | None = None):
    """The SFT objective for TrainStep: next-token loss on the labelled (assistant) tokens of packed rows, examples
    kept apart by their positions and mask; the MTP and balance losses as in pretraining."""
    b = batch.to(device)
    return model(b.input_ids, labels=b.labels, position_ids=b.position_ids, attn_mask=b.attn_mask,
                 balance_window=window, mtp_loss_weight=mtp_loss_weight)
