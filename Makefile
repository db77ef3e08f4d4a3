# `make test` and `make demo` set themselves up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= test

.PHONY: install test demo demo-post clean

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

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
