# One command sets up and runs each thing on a fresh machine (2 CPU cores are enough).
#   make train   - create .venv, install, train SFT on the built-in arithmetic task
#   make test    - create .venv, install, run the whole test suite (what CI runs)
# GPU users: install your CUDA build of torch into .venv first, then `make install TORCH=torch`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# the CPU wheel that lies on disk here; an open range would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install train test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) train.py algo=sft $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: install
	$(PY) bench/sft_speed.py

lint: install
	$(VENV)/bin/ruff check src tests bench sweeps scripts train.py sample.py

clean:
	rm -rf logs .pytest_cache .ruff_cache
