"""Text in and out of the engine: the tokenizer contract, streamed detokenization and stop strings.

Also home of `make_model_dir`, the tiny model directory (weights + a byte-level BPE tokenizer trained here) that
the other inference, CLI and server tests load.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference.tokenizer import BOS_TOKEN, EOS_TOKEN, TextStream, Tokenizer


def train_tokenizer(path) -> None:
    """A 400-token byte-level BPE trained on a few KB of Python source, with <|begin_of_text|>=0, <|end_of_text|>=1."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([inspect.getsource(json)[:6000], "héllo wörld — ünïcode ✓"], trainer)
    tok.save(str(path))


def make_model_dir(path, seed: int = 0, **overrides):
    """Save a random tiny model (fp32) and a tokenizer to `path`; returns the path."""
    torch.manual_seed(seed)
    model = seekmoe.build_model(ModelConfig.preset("tiny", **overrides))
    model.save_pretrained(path)
    train_tokenizer(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(path)
    return Tokenizer(path)


def test_tokenizer_finds_the_begin_and_end_of_text_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer.encode("def f(x): return x")
    assert ids[0] == 0 and tokenizer.decode(ids) == "def f(x): return x"
    assert tokenizer.encode("abc", add_bos=False)[0] != 0


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def stream_all(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(t) for t in tokenizer.encode(text, add_bos=False)]
    if not stream.stopped:
        deltas.append(stream.finish())
    return deltas, stream


def test_streamed_deltas_add_up_to_the_text_and_never_split_a_character(tokenizer):
    text = "héllo wörld — ünïcode ✓ and more"
    deltas, _ = stream_all(tokenizer, text, [])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(tokenizer):
    deltas, stream = stream_all(tokenizer, "import json\nclass Foo: pass", stop=["class"])
    assert stream.stopped and "".join(deltas) == "import json\n" == stream.text
    assert not any("cl" in d for d in deltas)  # a possible stop-string start is held back, not shown


@pytest.mark.parametrize("typed", ["hi<|end_of_text|>", "<|begin_of_text|>hi", "a<|end_of_text|><|begin_of_text|>b"])
def test_special_token_names_typed_by_a_user_are_encoded_as_text(tokenizer, typed):
    from seekmoe.inference.chat_template import format_chat

    ids = tokenizer.encode(typed)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.eos_token_id not in ids
    assert "".join(tokenizer.pieces(ids)) == typed  # every character came back as text
    # the chat path (the server's /v1/chat/completions and `seekmoe chat`): the template's BOS is the only special
    chat = tokenizer.encode(format_chat([{"role": "system", "content": typed}, {"role": "user", "content": typed}]))
    assert [t for t in chat if t in (tokenizer.bos_token_id, tokenizer.eos_token_id)] == [tokenizer.bos_token_id]


def test_broken_optional_tokenizer_files_fall_back_to_the_special_tokens(tmp_path):
    train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text("[" * 100_000)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ' * 100_000)
    tok = Tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)


def test_the_server_scores_special_token_names_in_a_prompt_as_text(tmp_path):
    """Through /v1/completions (echo) and /v1/chat/completions: the typed "<|end_of_text|>" is text tokens."""
    import openai

    from seekmoe.inference import Engine
    from seekmoe.inference.chat_template import format_chat
    from test_server import KEY, start, stop

    engine = Engine.from_pretrained(make_model_dir(tmp_path, max_position_embeddings=256), max_batch_size=2)
    server, thread = start(engine, api_key=KEY)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        text = "hi<|end_of_text|>there"
        out = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
        assert out.choices[0].text == text and "<|end_of_text|>" not in out.choices[0].logprobs.tokens
        assert out.usage.prompt_tokens == len(engine.tokenizer.encode(text)) > 10
        messages = [{"role": "user", "content": text}]
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0)
        assert chat.usage.prompt_tokens == len(engine.tokenizer.encode(format_chat(messages)))
    finally:
        stop(server, thread)
