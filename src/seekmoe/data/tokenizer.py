"""Byte-level BPE tokenizers trained with Hugging Face `tokenizers`, with seekmoe's two special tokens first."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|begin_of_text|>"  # id 0 = ModelConfig.bos_token_id
EOS_TOKEN = "<|end_of_text|>"  # id 1 = ModelConfig.eos_token_id; separates packed documents


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens learned from `documents`.

    Every byte is in the base alphabet, so any text encodes; ids 0 and 1 are BOS_TOKEN and EOS_TOKEN.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                         f"{len(alphabet) + 2} tokens (256 bytes + 2 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=alphabet, min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    for token, expected in ((BOS_TOKEN, 0), (EOS_TOKEN, 1)):
        if tokenizer.token_to_id(token) != expected:  # the trainer's contract; checked because the model relies on it
            raise RuntimeError(f"tokenizer put {token} at id {tokenizer.token_to_id(token)}, expected {expected}")
    return tokenizer
