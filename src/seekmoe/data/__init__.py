"""Training data: corpus discovery, byte-level BPE tokenizer training, tokenizing in bounded memory (resumable),
and cached, packed token shards."""

from .corpus import Corpus, default_corpus, discover_corpus
from .packing import PackedSequences, SequenceOrder
from .shards import TokenizedCorpus, prepare_data
from .tokenizer import BOS_TOKEN, EOS_TOKEN, train_tokenizer
from .tokenizing import tokenize_corpus

__all__ = ["Corpus", "default_corpus", "discover_corpus", "PackedSequences", "SequenceOrder", "TokenizedCorpus",
           "prepare_data", "BOS_TOKEN", "EOS_TOKEN", "train_tokenizer", "tokenize_corpus"]
