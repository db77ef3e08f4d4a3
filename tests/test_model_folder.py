"""A hostile or oversized config.json is refused in one line before anything is built or allocated
(model_folder.py), and the parameter arithmetic the refusal quotes is the model's own."""

import importlib
import json

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.cli import main
from seekmoe.info import parameter_count
from seekmoe.model_folder import TRAINING_BYTES_PER_PARAM, check_fits_memory, read_model_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    seekmoe.build_model(ModelConfig.preset("tiny")).save_pretrained(path)
    for module in ("seekmoe.inference.cli", "seekmoe.train.trainer", "seekmoe.posttrain.rl"):
        importlib.import_module(module)  # imported once here: each case then costs its checks alone
    return path


@pytest.fixture
def no_model_built(monkeypatch):
    """Any attempt to build a whole model (even on the meta device) or allocate one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(seekmoe.CausalLM, "__init__", refuse)
    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)


def hostile(folder, tmp_path, change) -> str:
    """A copy of `folder` whose config.json is `change(config dict)` (a dict, a list, or raw text)."""
    import shutil

    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    text = change(config)
    (tmp_path / "m" / "config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return str(tmp_path / "m")


HOSTILE = {
    "a list": (lambda c: [c], "JSON list: expected an object"),
    "100k deep": (lambda c: "[" * 100_000 + "]" * 100_000, "nests more than 32 levels deep"),
    "a million layers": (lambda c: {**c, "num_hidden_layers": 1_000_000}, "num_hidden_layers=1,000,000 is out of"),
    "100k MTP layers": (lambda c: {**c, "num_nextn_predict_layers": 100_000}, "num_nextn_predict_layers=100,000"),
    "hidden_size 1e8": (lambda c: {**c, "hidden_size": 1e8}, "hidden_size=100,000,000.0 is out of bounds"),
    "hidden_size 10^8": (lambda c: {**c, "hidden_size": 100_000_000}, "hidden_size=100,000,000 is out of bounds"),
    "not JSON": (lambda c: "{'hidden_size': 64}", "is not valid JSON"),
    "2 MB": (lambda c: {**c, "padding": "x" * 2_000_000}, "expected a config.json of at most"),
    "rope_scaling a list": (lambda c: {**c, "rope_scaling": [1, 2]}, "config.json: "),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_config_json_is_one_line_and_exit_2_before_any_model_is_built(folder, tmp_path, capsys,
                                                                               no_model_built, case):
    change, message = HOSTILE[case]
    path = hostile(folder, tmp_path, change)
    out = str(tmp_path / "out")
    for command in (["info", "--model", path], ["generate", "--model", path, "--prompt", "hi"],
                    ["train", "--init-from", path, "--out", out], ["sft", "--model", path, "--data", path, "--out", out],
                    ["rl", "--model", path, "--task", "arithmetic", "--out", out]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="config.json"):
        seekmoe.from_pretrained(path)


@pytest.mark.filterwarnings("ignore::seekmoe.checkpoint.MissingMTPWarning")
def test_a_model_too_big_for_this_machine_is_refused_with_the_arithmetic(folder, tmp_path, no_model_built):
    # Within every bound, yet ~ 1.8T parameters: the count comes from one block of each kind on the meta device.
    path = hostile(folder, tmp_path, lambda c: {**c, "hidden_size": 32768, "vocab_size": 4_000_000,
                                                "num_hidden_layers": 1000, "n_routed_experts": 256,
                                                "moe_intermediate_size": 2048, "n_group": 8})
    with pytest.raises(ValueError, match=r"does not fit in memory: .*T parameters x 4 bytes \(float32 weights\) = "
                                         r".* TiB, but cpu has .* available"):
        seekmoe.from_pretrained(path, dtype=torch.float32)
    assert main(["generate", "--model", path, "--prompt", "hi"]) == 2


def test_the_memory_check_counts_the_dtype_and_each_rank_share(monkeypatch):
    import seekmoe.model_folder as mf

    config = ModelConfig.preset("small")
    n = parameter_count(config)
    monkeypatch.setattr(mf, "available_memory", lambda device: (n * 2, "a test"))
    check_fits_memory(config, 2, "bfloat16 weights", torch.device("cpu"))  # exactly fits
    with pytest.raises(ValueError, match=r"x 4 bytes \(float32 weights\)"):
        check_fits_memory(config, 4, "float32 weights", torch.device("cpu"))
    # Training state sharded over 8 ranks, 8 of them on this machine: the machine needs all of it.
    check_fits_memory(config, 2, "w", torch.device("cpu"), shards=8, ranks_here=1)
    with pytest.raises(ValueError, match=r"/ 8 ranks = .* a rank, x 8 ranks on this machine"):
        check_fits_memory(config, TRAINING_BYTES_PER_PARAM, "training", torch.device("cpu"), shards=8,
                          ranks_here=8)


def test_training_a_model_too_big_is_refused_before_reading_data(tmp_path):
    from seekmoe.train import load_run_config
    from seekmoe.train.trainer import Trainer

    model_config, config = load_run_config("deepseek-v3", overrides={"max_steps": 1})
    with pytest.raises(ValueError, match=r"x 16 bytes \(fp32 weights, gradients and AdamW's two moments\)"):
        Trainer(model_config, config, tmp_path / "out", data=[str(tmp_path / "no-such-corpus")])


def test_run_overrides_are_held_to_the_same_bounds():
    from seekmoe.train import load_run_config

    with pytest.raises(ValueError, match="num_hidden_layers=1,000,000 is out of bounds"):
        load_run_config("tiny", overrides={"num_hidden_layers": 1_000_000})


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": True}, {"q_lora_rank": None, "num_nextn_predict_layers": 2},
    {"router_type": "hierarchical", "n_group": 2, "topk_group": 1, "aux_loss_alpha": 0.0,
     "num_experts_per_tok": 2, "topk_method": "greedy", "scoring_func": "softmax"},
    {"n_routed_experts": 0, "first_k_dense_replace": 2},
])
def test_parameter_count_equals_the_built_models(overrides):
    config = ModelConfig.preset("tiny", **overrides)
    with torch.device("meta"):
        model = seekmoe.CausalLM(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_a_sane_config_reads_as_before(folder):
    assert read_model_config(folder) == ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
