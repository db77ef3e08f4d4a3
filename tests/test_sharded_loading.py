"""Meta-device build and sharded loading (parallel/materialize.py): shards initialized as one process initializes the
whole model, folders read slice by slice (FP8 included) into the same weights `from_pretrained` gives, and under
torchrun a rank's peak memory well under the whole model's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig, build_model
from seekmoe.checkpoint import dequantize_fp8, quantize_fp8
from seekmoe.parallel.materialize import ShardedLoader, check_folder, materialize

WORKER = str(Path(__file__).parent / "sharded_worker.py")

ROUTERS = {
    "deepseek": {},
    "tied, no q-LoRA, two MTP layers": {"tie_word_embeddings": True, "q_lora_rank": None,
                                        "num_nextn_predict_layers": 2},
    "switch": {"router_type": "switch", "num_experts_per_tok": 1, "topk_method": "greedy", "n_group": 1,
               "topk_group": 1, "scoring_func": "softmax"},
    "hash": {"router_type": "hash", "num_experts_per_tok": 1, "topk_method": "greedy", "n_group": 1,
             "topk_group": 1, "scoring_func": "softmax"},
    "hierarchical": {"router_type": "hierarchical", "n_group": 2, "topk_group": 1, "topk_method": "greedy",
                     "scoring_func": "softmax"},
}


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert set(got_state) == set(want_state)
    for key, tensor in want_state.items():
        assert torch.equal(got_state[key], tensor), key


@pytest.mark.parametrize("case", ROUTERS)
def test_shards_initialize_to_the_one_process_weights_for_the_same_seed(case):
    config = ModelConfig.preset("tiny", **ROUTERS[case])
    torch.manual_seed(7)
    want = build_model(config)
    torch.manual_seed(7)
    got = materialize(build_model(config, device="meta"), torch.device("cpu"))
    assert_same_model(got, want)
    assert torch.equal(got.model.rotary_emb.inv_freq, want.model.rotary_emb.inv_freq)
    torch.manual_seed(8)
    assert not torch.equal(materialize(build_model(config, device="meta"), torch.device("cpu"))
                           .model.embed_tokens.weight, want.model.embed_tokens.weight)


@pytest.mark.parametrize("shard_bytes", [None, 100_000])
def test_a_folder_materializes_into_the_weights_from_pretrained_reads(tmp_path, shard_bytes):
    source = build_model(ModelConfig.preset("tiny", tie_word_embeddings=True))
    source.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    model = build_model(source.config, device="meta")
    check_folder(model, tmp_path)
    got = materialize(model, torch.device("cpu"), tmp_path)
    assert_same_model(got, seekmoe.from_pretrained(tmp_path, dtype=torch.float32))
    assert got.lm_head.weight is got.model.embed_tokens.weight


def test_a_folder_that_does_not_match_is_refused_on_the_meta_device(tmp_path):
    build_model(ModelConfig.preset("tiny")).save_pretrained(tmp_path)
    model = build_model(ModelConfig.preset("tiny", moe_intermediate_size=48), device="meta")
    with pytest.raises(ValueError, match="has shape .* the model expects"):
        check_folder(model, tmp_path)


def test_fp8_rows_are_dequantized_slice_by_slice_as_the_whole_matrix_is(tmp_path):
    from safetensors.torch import save_file

    block = (16, 16)
    weight = torch.randn(70, 40)  # ragged against the blocks both ways
    q, scale_inv = quantize_fp8(weight, block)
    save_file({"model.embed_tokens.weight": q, "model.embed_tokens.weight_scale_inv": scale_inv},
              str(tmp_path / "model.safetensors"))
    config = ModelConfig.preset("tiny", vocab_size=70, hidden_size=40)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": list(block)}}))
    model = build_model(config, device="meta")
    loader = ShardedLoader(model, tmp_path)
    whole = dequantize_fp8(q, scale_inv, block)
    for rows in (slice(0, 70), slice(0, 35), slice(35, 70), slice(17, 18), slice(31, 49)):
        assert torch.equal(loader.read("model.embed_tokens.weight", (rows, slice(0, 40))), whole[rows])


def test_an_fp8_folder_materializes_into_what_from_pretrained_dequantizes(tmp_path):
    from safetensors.torch import load_file, save_file

    block = (16, 16)
    build_model(ModelConfig.preset("tiny")).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for key in [k for k, w in state.items() if k.endswith("proj.weight") and w.dim() == 2]:
        state[key], state[key + "_scale_inv"] = quantize_fp8(state[key], block)
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    got = materialize(build_model(ModelConfig.from_json_file(tmp_path), device="meta"), torch.device("cpu"), tmp_path)
    assert_same_model(got, seekmoe.from_pretrained(tmp_path, dtype=torch.float32))


def torchrun(nproc: int, *args: str, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_under_fsdp_and_expert_parallelism_each_rank_reads_only_its_shards_and_peaks_well_under_the_model(
        tmp_path):
    # The worker also checks, on rank 0, the gathered model against from_pretrained and a fresh run's shards against
    # the one-process initialization, bit for bit.
    # ~ 40 MB of fp32 weights: big enough that a rank's own half stands out of the noise, small enough to be quick.
    config = ModelConfig.preset("tiny", vocab_size=8192, hidden_size=256, num_hidden_layers=3, n_routed_experts=16,
                                moe_intermediate_size=256, num_attention_heads=4, kv_lora_rank=64, q_lora_rank=64,
                                num_nextn_predict_layers=0)
    build_model(config).save_pretrained(tmp_path / "model", max_shard_bytes=4_000_000)
    torchrun(2, WORKER, str(tmp_path / "model"), "2", str(tmp_path / "result"))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result.{rank}").read_text())
        print(f"rank {rank}: peak growth {r['peak_growth_bytes'] / 2**20:.1f} MiB, own shards "
              f"{r['local_param_bytes'] / 2**20:.1f} MiB, whole model {r['model_bytes'] / 2**20:.1f} MiB")
        assert r["model_bytes"] > 30e6
        assert r["local_param_bytes"] < 0.55 * r["model_bytes"]
        assert r["peak_growth_bytes"] < 0.75 * r["model_bytes"]


def test_trainable_rows_split_on_the_meta_device_fill_as_in_one_process(tmp_path):
    """`--train new-experts` under torchrun splits the new experts' rows off before parallelize: a fresh
    initialization and a folder's weights must reach those rows too, as they do in one process."""
    from seekmoe.grow.expand import expand_model
    from seekmoe.train.freeze import select_trainable

    grown = expand_model(build_model(ModelConfig.preset("tiny")), 4, init="copy")[0]
    grown.save_pretrained(tmp_path)
    want = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    select_trainable(want, "new-experts,router")
    model = build_model(want.config, device="meta")
    select_trainable(model, "new-experts,router")
    check_folder(model, tmp_path)
    assert_same_model(materialize(model, torch.device("cpu"), tmp_path), want)

    torch.manual_seed(3)
    fresh = build_model(want.config)
    select_trainable(fresh, "new-experts,router")
    torch.manual_seed(3)
    model = build_model(want.config, device="meta")
    select_trainable(model, "new-experts,router")
    assert_same_model(materialize(model, torch.device("cpu")), fresh)
