# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
# Both create .venv when it is missing, install torch pinned first (a CPU build installs from a
# local file on CPU machines; an unpinned torch would pull the CUDA stack), then the project.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
TESTS ?= tests
PYTEST_ARGS ?=
BENCH_ARGS ?=
RUN_DIR ?= runs/quickstart
SYNTHETIC_DIR ?= data/synthetic
QUICKSTART_RANKS ?= 2
TRAIN_ARGS ?=

.PHONY: install quickstart test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(PY) -m pip install -e '.[dev]'
	touch $@

$(SYNTHETIC_DIR)/.complete: $(VENV)/.installed
	$(PY) tools/make_synthetic.py --out $(SYNTHETIC_DIR)
	touch $@

# Two ranks on the CPU, data parallel under DeepSpeed ZeRO-3 (gloo); extra recipe overrides in TRAIN_ARGS.
quickstart: $(SYNTHETIC_DIR)/.complete
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(QUICKSTART_RANKS) --no-python \
		$(VENV)/bin/imontage-train configs/recipes/quickstart.yaml parallel=zero3_dp2 parallel.device=cpu \
		run_dir=$(RUN_DIR) data.shards='$(SYNTHETIC_DIR)/train-*.tar' $(TRAIN_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(TESTS) -m "not benchmark" $(PYTEST_ARGS)

# Benchmarks print tables and write CSV under runs/bench; e.g. make bench BENCH_ARGS="--bench-size small"
bench: $(VENV)/.installed
	$(PY) -m pytest tests/benchmarks -m benchmark -s $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy imontage kernels megatron_patches tools

clean:
	rm -rf $(VENV) build *.egg-info
