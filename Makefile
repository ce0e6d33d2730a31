# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
# Both create .venv when it is missing, install torch pinned first (a CPU build installs from a
# local file on CPU machines; an unpinned torch would pull the CUDA stack), then the project.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
TESTS ?= tests
PYTEST_ARGS ?=
# make test's pytest-xdist workers (0: one process). In one process the suite left the 2 cores idle
# 40% of the time (SLURM's requeues and timeouts, rank start-up, 2-rank launches); two workers keep
# both busy (22 min 44 s in one process, 15 to 17 min on two, on the 2-core VM). Every torch runs
# one intra-op thread (OMP_NUM_THREADS=1), as run_ranks's ranks do: beside another busy process a
# second spin-waiting thread made small models' steps many times slower (conftest's one_thread).
TEST_WORKERS ?= 2
BENCH_ARGS ?=
RUN_DIR ?= runs/quickstart
SYNTHETIC_DIR ?= data/synthetic
QUICKSTART_RANKS ?= 2
TRAIN_ARGS ?=
# Triton 3.6, what the lent GPU machines run, laid over this environment's torch (which needs no triton on
# a CPU): tests/test_triton_versions.py runs the kernel checks against it. Its interpreter needs numpy < 2.4.
TRITON36_ENV ?= .venv-triton36
# Pure-Python wheels the GPU machines lack (tools/device_wheels.txt), for tools/device_check.sh.
WHEEL_DIR ?= .whl

.PHONY: install quickstart test test-multihost lint bench clean triton36-env device-wheels

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

test: $(VENV)/.installed $(TRITON36_ENV)/.installed
	OMP_NUM_THREADS=1 IMONTAGE_TRITON36_ENV=$(abspath $(TRITON36_ENV)) $(PY) -m pytest $(TESTS) -m "not benchmark" \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The two-host SLURM cluster's cases alone (root; docs/slurm.md); make test runs them too.
test-multihost: $(VENV)/.installed
	$(PY) -m pytest tests/test_slurm_multi_host.py $(PYTEST_ARGS)

triton36-env: $(TRITON36_ENV)/.installed

$(TRITON36_ENV)/.installed: | $(VENV)/.installed
	$(PY) -m pip install --no-deps --upgrade --target $(TRITON36_ENV) triton==3.6.0 'numpy>=2,<2.4'
	touch $@

# Fills $(WHEEL_DIR) for the GPU check (docs/performance.md, "GPU check"); prints the total size.
device-wheels: $(VENV)/.installed
	PY=$(PY) tools/fill_wheels.sh tools/device_wheels.txt $(WHEEL_DIR)

# Benchmarks print tables and write CSV under runs/bench; e.g. make bench BENCH_ARGS="--bench-size small"
bench: $(VENV)/.installed
	$(PY) -m pytest tests/benchmarks -m benchmark -s $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy imontage kernels megatron_patches tools
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(TRITON36_ENV) build *.egg-info
