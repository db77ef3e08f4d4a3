"""The GPU proof kit (benchmarks/gpu_check.py) without a GPU: its CPU dry run runs every step at toy size and exits
0, so the kit cannot rot before a GPU comes; its budget cuts a step that overruns and skips the steps it has no time
for; the bf16 peak table names the GPUs we get."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what runs without CUDA")
def test_dry_run_runs_every_step_at_toy_size_without_timings_and_exits_0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH"))
                                         if p)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device: CPU dry run" in done.stdout
    [json_path] = tmp_path.glob("gpu-check-*-dry-run.json")
    assert json_path.with_suffix(".md").is_file()
    result = json.loads(json_path.read_text())
    assert result["mode"] == "CPU dry run"
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == ["cuda tests", "training", "moe layer", "decode", "serving"]
    for name, step in steps.items():
        if name == "serving" and step["status"] == "skipped":  # fastapi or uvicorn missing: said, not failed
            assert "not installed" in step["message"]
            continue
        assert step["status"] == "ok", (name, step["message"])
        assert step["rows"], name
        for row in step["rows"]:
            for key in ("ms", "ms/step", "tokens/s", "TFLOP/s", "MFU", "requests_per_s", "ttft_p50_ms"):
                assert row.get(key) is None, (name, key, row)  # no timings off a GPU
    assert all(r["outcome"] == "skipped" for r in steps["cuda tests"]["rows"])
    assert {r["compile"] for r in steps["training"]["rows"]} == {True, False}
    assert {r["engine"] for r in steps["decode"]["rows"]} >= {"seekmoe eager", "seekmoe compiled",
                                                              "seekmoe compiled + MTP"}
    assert all(r["same tokens as eager"] for r in steps["decode"]["rows"])


def test_a_step_that_overruns_its_slice_is_cut_and_later_steps_without_time_are_skipped(tmp_path, monkeypatch):
    def endless(check, step):
        check.add(step, {"row": 1})
        while True:
            time.sleep(0.05)

    monkeypatch.setitem(gpu_check.STEPS, "training", endless)
    monkeypatch.setitem(gpu_check.SLICES, "training", 60)  # more than the budget: cut by it
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.2)
    check = gpu_check.Check(0.8, tmp_path, tmp_path / "copy", ["training", "moe layer"])
    gpu_check.run(check)
    training, moe = check.steps
    assert training.status == "cut" and training.rows == [{"row": 1}]
    assert moe.status == "skipped" and "budget is spent" in moe.message
    written = json.loads(check.paths[0].read_text())
    assert [s["status"] for s in written["steps"]] == ["cut", "skipped"]
    assert (tmp_path / "copy" / check.paths[1].name).read_text() == check.paths[1].read_text()


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_bf16_peak_is_found_by_device_name(name, peak):
    assert gpu_check.peak_bf16_tflops(name) == peak
