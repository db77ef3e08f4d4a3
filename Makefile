# `make test` and `make demo` set themselves up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= test

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch==2.13.0 is installed only when no torch is importable, so a user's own (CUDA) torch is kept.
install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

test: install
	$(PY) -m pytest tests

demo: install
	$(VENV)/bin/seekmoe info --preset deepseek-v3
	$(PY) -c "import torch, seekmoe; m = seekmoe.build_model(seekmoe.ModelConfig.preset('tiny')); x = torch.randint(0, m.config.vocab_size, (2, 16)); print('tiny forward: logits', tuple(m(x).logits.shape))"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
