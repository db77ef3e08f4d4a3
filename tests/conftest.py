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


def assert_resume_is_exact(main, args: list[str], tmp_path: Path, stop_at: int = 2):
    """A run of `seekmoe ARGS` stopped at `stop_at` and resumed ends with weights bit-identical to an
    uninterrupted run; returns (uninterrupted, resumed) final models."""
    from seekmoe import from_pretrained

    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    assert main(args + ["--out", str(tmp_path / "cut"), "--stop-at", str(stop_at)]) == 0
    assert main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = from_pretrained(tmp_path / "full" / "final"), from_pretrained(tmp_path / "cut" / "final")
    for (name, p), q in zip(full.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(p, q), name
    return full, cut
