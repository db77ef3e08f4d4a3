import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture
def tiny_config():
    from seekmoe import ModelConfig

    return ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real text corpus: a dozen standard-library modules in a folder."""
    from test_data import stdlib_sample

    return stdlib_sample(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A tokenizer and token-shard cache shared by one module's training runs."""
    return str(tmp_path_factory.mktemp("cache"))
