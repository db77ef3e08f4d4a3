"""Text in and out: a model directory's `tokenizer.json`, and incremental detokenization with stop strings."""

from __future__ import annotations

import codecs
from functools import cached_property
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` plus the model's begin/end-of-text ids."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self._tok = read_tokenizer_file(path)
        # Text is text: "<|end_of_text|>" typed by a user (a prompt, a chat message, an SFT record) must not become
        # the real end-of-text token, or anyone can end a turn or a document early; the real special tokens enter
        # only as ids (BOS here, EOS and the turns' structure from the chat template and its callers).
        self._tok.encode_special_tokens = True
        # The ids given (the model's config), else the folder's generation_config.json / tokenizer_config.json (a
        # real DeepSeek folder has both), else seekmoe's own special tokens.
        saved = _saved_special_ids(path.parent, self._tok)
        self.bos_token_id = next((i for i in (bos_token_id, saved.get("bos"), self._tok.token_to_id(BOS_TOKEN))
                                  if i is not None), None)
        self.eos_token_id = next((i for i in (eos_token_id, saved.get("eos"), self._tok.token_to_id(EOS_TOKEN))
                                  if i is not None), None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, after the begin-of-text token unless add_bos is False; special-token names in the
        text (e.g. "<|end_of_text|>") are encoded as the plain text they are, never as the special token."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes token `token_id` stands for (b"" for special tokens): what incremental decoding adds."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_text(self, token_id: int) -> str:
        """One token on its own as text, distinct for distinct tokens: a special token's name, its text, or for a
        token holding part of a character, "bytes:" and its bytes escaped (OpenAI's and vLLM's form)."""
        if token_id in self._special:
            return self._tok.id_to_token(token_id)
        if not 0 <= token_id < len(self._bytes):  # the model's vocabulary may be larger than the tokenizer's
            return f"<|unknown token {token_id}|>"
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def pieces(self, ids: list[int]) -> list[str]:
        """The text each token adds to the decoded sequence: "".join(pieces(ids)) == decode(ids) for byte-level
        BPE, and a character split across tokens belongs to the token that completes it."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = [decoder.decode(self.token_bytes(t)) for t in ids]
        if out:
            out[-1] += decoder.decode(b"", final=True)
        return out

    @cached_property
    def max_token_bytes(self) -> int:
        """The longest token in bytes: a text of more than n * this many bytes has more than n tokens."""
        return max(1, max(len(b) for b in self._bytes))

    @cached_property
    def _special(self) -> set[int]:
        added = self._tok.get_added_tokens_decoder()
        return {i for i, t in added.items() if t.special}

    @cached_property
    def _bytes(self) -> list[bytes]:
        """Each token id's bytes: read off the byte-level alphabet when the decoder is byte-level (GPT-2's, which
        DeepSeek's tokenizers use), else by decoding the token alone."""
        from tokenizers import decoders

        n = self._tok.get_vocab_size()
        special = self._special
        if isinstance(self._tok.decoder, decoders.ByteLevel):
            table = {c: b for b, c in _byte_level_alphabet().items()}
            out = []
            for i in range(n):
                token = self._tok.id_to_token(i)
                if i in special or token is None or any(c not in table for c in token):
                    out.append(b"" if i in special or token is None else self._tok.decode([i]).encode())
                else:
                    out.append(bytes(table[c] for c in token))
            return out
        return [b"" if i in special else self._tok.decode([i]).encode() for i in range(n)]


def read_tokenizer_file(path: str | Path):
    """The `tokenizers.Tokenizer` saved at `path` (a model folder's tokenizer.json); FileNotFoundError or ValueError
    naming the file when it is missing or not a tokenizer (`tokenizers` raises a bare Exception naming neither)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json at {path}: expected the tokenizer saved with the model")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, not a file: expected the tokenizer.json saved with the model")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # a parse error of any depth inside the Rust library
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path} is not a valid tokenizer file ({why}): expected a Hugging Face tokenizers JSON "
                         f"file (tokenizer.json)") from None


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that stands for it in a byte-level vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _saved_special_ids(folder: Path, tok) -> dict[str, int]:
    """bos/eos ids from a model folder's generation_config.json, else its tokenizer_config.json's tokens."""
    import json

    out: dict[str, int] = {}
    try:
        generation = json.loads((folder / "generation_config.json").read_text())
        out.update({k: generation[f"{k}_token_id"] for k in ("bos", "eos")
                    if isinstance(generation.get(f"{k}_token_id"), int)})
    except (OSError, ValueError, AttributeError, RecursionError):  # a broken optional file is no file
        pass
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for k in ("bos", "eos"):
            token = config.get(f"{k}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if k not in out and isinstance(token, str) and tok.token_to_id(token) is not None:
                out[k] = tok.token_to_id(token)
    except (OSError, ValueError, AttributeError, RecursionError):  # a broken optional file is no file
        pass
    return out


# seekmoe's chat formatting (chat_template.format_chat) as the Jinja template transformers applies, after BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']] + ': ' + message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif -%}"
)


def write_tokenizer_files(tokenizer, folder: str | Path, model_max_length: int) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` (special tokens, BOS added to every prompt, the chat template)
    and `generation_config.json` (bos/eos ids) into a model folder, so that transformers' AutoTokenizer,
    `pipeline("text-generation")` and evaluation harnesses start prompts with BOS, stop at EOS and format chats as
    seekmoe does. `tokenizer` is a `tokenizers.Tokenizer` holding BOS_TOKEN and EOS_TOKEN."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    folder = Path(folder)
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer lacks {BOS_TOKEN!r} or {EOS_TOKEN!r}: train it with seekmoe's tokenizer")
    # transformers' generic fast tokenizer adds BOS only through the tokenizer's post-processor (seekmoe itself
    # encodes with add_special_tokens=False and adds BOS on its own, so this changes nothing for seekmoe).
    with_bos = HFTokenizer.from_str(tokenizer.to_str())
    with_bos.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                            special_tokens=[(BOS_TOKEN, bos)])
    with_bos.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
              "pad_token": EOS_TOKEN, "add_bos_token": True, "add_eos_token": False,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


class TextStream:
    """Turns a growing list of token ids into text deltas that are safe to show.

    A delta never ends inside a multi-byte character (byte-level BPE splits them across tokens) nor inside what
    could still become a stop string; once a stop string appears, the text ends right before it. Each token costs
    the decoding of its own bytes only (an incremental UTF-8 decoder), not of the whole text so far.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly safe text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text += self._utf8.decode(self.tokenizer.token_bytes(token_id))
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        safe = len(self.text)  # a character still missing bytes waits in the UTF-8 decoder, not in text
        for s in self.stop:  # hold back a tail that is the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k: safe] == s[:k]:
                    safe -= k
                    break
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        """The text held back so far, once generation has ended without a stop string."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted: end]
        self.emitted = max(self.emitted, end)
        return delta
