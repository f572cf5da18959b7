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

# Issue 12 (speed) in one run: both model sizes (llama_1b, 1.24B params, and llama_1b_x2, 32 layers, 2.21B),
# every direction, one round each (--repeat 1): about 5 min for 1b (checkpoint builds included) and, scaling by
# the bytes, ~10 min for 1b_x2 on a 2-core box, so ~15 min in all; --repeat N reports each tool's fastest of N
# (N rounds cost ~N x that, minus the builds).  Disk: ~49 GB free on the first run (checkpoints kept in
# bench/out for reuse: ~21 GB; the 1b_x2 DCP -> HF step needs ~28 GB more); a size without room is skipped
# with a message.  Faster: --size 1b, or --layers K for a smaller model.
bench: install
	$(PYTHON) bench/bench_verl_to_hf.py --size both --repeat 1
	$(PYTHON) bench/bench_dcp.py --size both --repeat 1

clean:
	rm -rf $(VENV) build *.egg-info
