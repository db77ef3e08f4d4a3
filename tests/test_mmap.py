"""Mapped loading (`from_pretrained(mmap=True)`, `seekmoe generate --mmap`): the weights stay in their files, the
logits are the copied load's, and resident memory grows by what a forward touches, not by the weights' size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import seekmoe
from seekmoe import ModelConfig, from_pretrained

SRC = str(Path(seekmoe.__file__).parents[1])


def _save(path: Path, dtype=torch.float32, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    seekmoe.build_model(ModelConfig.preset("tiny", **overrides)).to(dtype).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapped_model_gives_the_copied_models_logits_with_every_weight_in_the_file(tmp_path, dtype):
    folder = _save(tmp_path / "m", dtype)
    copied, mapped = from_pretrained(folder), from_pretrained(folder, mmap=True)
    assert mapped.mapping.copied_bytes == 0 and mapped.mapping.mapped_bytes > 0
    storages = {p.untyped_storage().data_ptr() for p in mapped.parameters()}
    assert len(storages) == 1  # one file, one mapping: every parameter (expert stacks too) is a view of it
    assert mapped.model.layers[1].mlp.experts.gate_up_proj.dtype == dtype
    x = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(mapped(x).logits, copied(x).logits, rtol=0, atol=0)


def test_saved_files_keep_each_expert_stack_back_to_back_and_stay_ordinary_safetensors(tmp_path):
    folder = _save(tmp_path / "m")
    from seekmoe.mapped_weights import read_header

    _, header = read_header(folder / "model.safetensors")
    spans = [header[f"model.layers.1.mlp.experts.{e}.{p}.weight"]["data_offsets"]
             for e in range(8) for p in ("gate_proj", "up_proj")]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    state = load_file(str(folder / "model.safetensors"))  # safetensors' own reader takes the order
    model = from_pretrained(folder)
    torch.testing.assert_close(state["model.layers.1.mlp.experts.3.up_proj.weight"],
                               model.model.layers[1].mlp.experts.gate_up_proj[3, 32:])


def test_a_folder_written_in_name_order_still_loads_mapped_with_its_stacks_copied(tmp_path):
    from safetensors.torch import save_file

    folder = _save(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    save_file(state, str(folder / "model.safetensors"))  # safetensors' writer: sorted by name, experts 0, 1, 10, ...
    with pytest.warns(UserWarning, match="copied into memory instead of mapped"):
        mapped = from_pretrained(folder, mmap=True)
    assert "model.layers.1.mlp.experts.gate_up_proj" in mapped.mapping.copied
    x = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(mapped(x).logits, from_pretrained(folder)(x).logits, rtol=0, atol=0)


def test_mapped_load_refuses_a_dtype_conversion(tmp_path):
    folder = _save(tmp_path / "m", torch.bfloat16)
    with pytest.raises(ValueError, match="a conversion would copy every weight"):
        from_pretrained(folder, dtype=torch.float32, mmap=True)


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    import seekmoe
    from seekmoe import ModelConfig, from_pretrained
    from seekmoe.mapped_weights import memory_stats
    torch.set_num_threads(1)
    # The first model built and run in a process pays one-time costs (lazy imports, kernels): before the baseline.
    with torch.no_grad():
        seekmoe.build_model(ModelConfig.preset("tiny"))(torch.tensor([[1, 2]]))
    before = memory_stats()
    model = from_pretrained(sys.argv[1], mmap=True)
    loaded = memory_stats()
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17, 99, 3]])).logits
    after = memory_stats()
    torch.save(logits, sys.argv[2])
    print(json.dumps({"load": loaded["rss"] - before["rss"], "forward": after["rss"] - before["rss"],
                      "file_pages": after.get("rss_file", 0) - before.get("rss_file", 0)}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident memory is read from /proc")
def test_mapped_forward_pages_in_only_what_it_touches(tmp_path):
    # ~100 MB of weights, almost all routed experts (64 a layer, 2 used per token): a 4-token forward touches the
    # dense weights and at most 8 experts a layer.
    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset(
        "tiny", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=3,
        n_routed_experts=64, num_experts_per_tok=2, n_group=1, topk_group=1, num_nextn_predict_layers=0)).eval()
    folder = tmp_path / "big"
    model.save_pretrained(folder)
    weights = (folder / "model.safetensors").stat().st_size
    assert weights > 90 * 2**20
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), str(tmp_path / "logits.pt")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth["load"] < 0.05 * weights, growth  # nothing read at load
    assert growth["forward"] < 0.3 * weights, growth
    with torch.no_grad():
        want = model(torch.tensor([[5, 17, 99, 3]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=0, atol=0)


def test_generate_stats_reports_memory_and_the_mapping(tmp_path, capsys):
    from seekmoe.cli import main
    from test_inference_tokenizer import make_model_dir

    folder = make_model_dir(tmp_path / "m")
    assert main(["generate", "--model", str(folder), "--prompt", "def f", "--max-new-tokens", "3", "--mmap",
                 "--stats"]) == 0
    err = capsys.readouterr().err
    assert "peak RSS" in err and "weights mapped from files" in err and "copied 0.00 GiB" in err


def test_auto_maps_a_model_that_does_not_fit_and_says_so(tmp_path, monkeypatch):
    import seekmoe.checkpoint as checkpoint

    folder = _save(tmp_path / "m", torch.bfloat16)
    assert not hasattr(from_pretrained(folder, mmap="auto"), "mapping")  # fits: copied as before
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: (1000, "a test"))
    with pytest.warns(checkpoint.MappedLoadNote, match="do not fit in memory"):
        assert from_pretrained(folder, mmap="auto").mapping.copied_bytes == 0
    with pytest.raises(ValueError, match="--mmap --dtype bfloat16"):
        from_pretrained(folder, dtype=torch.float32, mmap="auto")


def test_fp8_weights_are_dequantized_into_memory_and_the_rest_stays_mapped(tmp_path):
    import json

    from safetensors.torch import save_file

    from seekmoe.checkpoint import quantize_fp8

    block = (16, 16)
    folder = _save(tmp_path / "m", torch.bfloat16)
    state = load_file(folder / "model.safetensors")
    for key in [k for k, w in state.items() if k.endswith("self_attn.o_proj.weight")]:
        state[key], state[key + "_scale_inv"] = quantize_fp8(state[key], block)
    save_file(state, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="copied into memory"):
        mapped = from_pretrained(folder, mmap=True)
    assert "model.layers.0.self_attn.o_proj.weight" in mapped.mapping.copied and mapped.mapping.mapped_bytes > 0
    x = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(mapped(x).logits, from_pretrained(folder)(x).logits, rtol=0, atol=0)
