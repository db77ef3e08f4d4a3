# `make test` and `make demo` set themselves up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= test

.PHONY: install test demo demo-post demo-vision clean gpu-check gpu-wheels test-min-torch

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch==2.13.0 is installed only when no torch is importable, so a user's own (CUDA) torch is kept.
install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

test: install
	$(PY) -m pytest tests

# The main job: train the small preset on Python's standard library for a few minutes on 2 CPU cores, then print a
# summary table and a greedy completion. The tokenizer and token shards are cached (~/.cache/seekmoe) for reruns.
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 1500
demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/seekmoe train --preset small --out $(DEMO_OUT) --max-steps $(DEMO_STEPS)
	$(PY) -m seekmoe.train.report $(DEMO_OUT)

# Post-training end to end on 2 CPU cores in minutes: a tiny model learns the arithmetic task's format by SFT, then
# GRPO raises its reward; prints a before/after table (also in $(DEMO_POST_OUT)/results.json).
DEMO_POST_OUT ?= runs/demo-post
demo-post: install
	rm -rf $(DEMO_POST_OUT)
	$(PY) -m seekmoe.posttrain.demo --out $(DEMO_POST_OUT)

# A tiny vision-language model grown from a text model, on 2 CPU cores in minutes: pictures the project draws (shapes, colours, counts,
# positions), a tiny text model pretrained on their questions, `seekmoe sft --vision-tower tiny` (stage align, then
# full); prints a before/after accuracy table and writes `seekmoe analyze`'s routing per modality and a picture of it
# ($(DEMO_VISION_OUT)/{results.json,analysis/,modality.png}). Pillow and matplotlib come with the test extras.
DEMO_VISION_OUT ?= runs/demo-vision
demo-vision: install
	rm -rf $(DEMO_VISION_OUT)
	$(PY) -m seekmoe.vision.demo --out $(DEMO_VISION_OUT)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# The GPU proof kit (benchmarks/gpu_check.py; benchmarks/README.md, "GPU check"): on a CUDA machine the CUDA tests
# and the GPU benchmarks within 8 minutes, results in benchmarks/results/gpu-check-<date>.{json,md}; without CUDA
# a CPU dry run. No install step: GPU machines have no internet, so it runs on their own python3 (or .venv's, where
# there is one) with this tree's src/ on the path.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Wheels (Python 3.12, manylinux x86_64) of seekmoe's runtime dependencies that the GPU machines lack (the server's),
# with their own dependencies, into .gpu-wheels/ (ignored, ~4 MB): carried to the machine, gpu-check installs them
# from there with `pip --no-index`.
GPU_WHEELS := "fastapi>=0.115" "pydantic>=2.7" "uvicorn>=0.30"
gpu-wheels:
	rm -rf .gpu-wheels
	$(PYTHON) -m pip download -q --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
		-d .gpu-wheels $(GPU_WHEELS)

# The lowest torch pyproject admits, in a second environment (not part of `make test`; several GB, as PyPI's torch
# is a CUDA build): torch $(MIN_TORCH) and transformers $(MIN_TRANSFORMERS), what the GPU machines have; a 3-step
# training run, generate, info, the gpu-check dry run and the model, training and distributed tests.
MIN_TORCH ?= 2.11.0
MIN_TRANSFORMERS ?= 5.17.0
MIN_VENV ?= /tmp/venv-min-torch
test-min-torch:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q torch==$(MIN_TORCH)
	$(MIN_VENV)/bin/python -m pip install -q -e ".[test]" transformers==$(MIN_TRANSFORMERS)
	rm -rf $(MIN_VENV)/run
	$(MIN_VENV)/bin/seekmoe train --preset tiny --max-steps 3 --out $(MIN_VENV)/run
	$(MIN_VENV)/bin/seekmoe generate --model $(MIN_VENV)/run/final --prompt "def " --max-new-tokens 8
	$(MIN_VENV)/bin/seekmoe info --preset deepseek-v2-lite
	$(MIN_VENV)/bin/python benchmarks/gpu_check.py --out-dir $(MIN_VENV)/gpu-check
	$(MIN_VENV)/bin/python -m pytest tests/test_model.py tests/test_train.py tests/test_distributed.py \
		tests/test_gpu_check.py
