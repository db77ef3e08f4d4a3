"""Text in and out: a model directory's `tokenizer.json`, and incremental detokenization with stop strings."""

from __future__ import annotations

from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` plus the model's begin/end-of-text ids."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}: expected the tokenizer saved with the model")
        self._tok = HFTokenizer.from_file(str(path))
        self.bos_token_id = bos_token_id if bos_token_id is not None else self._tok.token_to_id(BOS_TOKEN)
        self.eos_token_id = eos_token_id if eos_token_id is not None else self._tok.token_to_id(EOS_TOKEN)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, after the begin-of-text token unless add_bos is False or the text starts with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self._tok.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns a growing list of token ids into text deltas that are safe to show.

    A delta never ends inside a multi-byte character (byte-level BPE splits them across tokens) nor inside what
    could still become a stop string; once a stop string appears, the text ends right before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly safe text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that is the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k: safe] == s[:k]:
                    safe -= k
                    break
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        """The text held back so far, once generation has ended without a stop string."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted: end]
        self.emitted = max(self.emitted, end)
        return delta
