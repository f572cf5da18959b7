# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned set (requirements.lock) under the
# torch==2.13.0 constraint, so pip never pulls a CUDA build of torch.
PY      ?= python3
VENV    := .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.lock constraints.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -r requirements.lock
	$(PIP) install -q -c constraints.txt --no-deps -e .
	$(PYTHON) -c "import torch, transformers, verl, ckpt_bridge; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: install
	$(PYTHON) -m ckpt_bridge.demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/bench_verl_to_hf.py --repeat 3
	$(PYTHON) bench/bench_dcp.py --repeat 2

clean:
	rm -rf $(VENV) build *.egg-info
