# Set-up and everyday commands. Each target installs what it needs into .venv first.
#   make test     unit and end-to-end tests (CPU)
#   make test-kernels  the Triton kernels' tests in Triton's CPU interpreter
#   make bench    the default suite (CUDA when present, else CPU)
#   make report   an HTML report of the latest run
#   make lint     ruff
#   make outsider the wheel in a fresh venv, used from an empty repository (.ci/outsider.sh)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch installed when none is importable: a CPU build where no NVIDIA driver is seen.
# Override, e.g. TORCH_SPEC="torch==2.11.0", or install your own torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
SUITE ?= suites/default.toml

.PHONY: test test-kernels bench report lint smoke perf-gate outsider clean

# --system-site-packages: a torch already installed for this Python is used, not replaced.
$(VENV)/bin/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null && echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.base: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e .
	@touch $@

# The peers plugin is its own package (plugins/moebench-peers), installed as a user would.
$(VENV)/.test: $(VENV)/.base plugins/moebench-peers/pyproject.toml
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -e plugins/moebench-peers
	@touch $@

$(VENV)/.report: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[report]"
	@touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q

# The Triton kernels (router top-k, alignment, the fused GEMMs, the backward's) run in
# Triton's CPU interpreter, so their logic (and the contract of their dependent launch,
# read from their source) is checked on every change without a GPU. A
# venv of its own: Triton 3.6's interpreter needs numpy < 2.3 (newer numpy refuses to
# turn a one-element array into an index), which `.venv` does not pin.
KVENV ?= .venv-kernels
KPY := $(KVENV)/bin/python
TRITON_SPEC ?= triton==3.6.0
KERNEL_TESTS := tests/test_triton.py tests/test_route_kernel.py tests/test_router_logits.py \
  tests/test_dependent_launch.py tests/test_triton_backward_rows.py tests/test_fast_launch.py \
  tests/test_tma.py tests/test_shipped_tuning.py tests/test_parallel_compile.py \
  tests/test_offline_compile.py tests/test_gluon_down.py tests/test_gluon_gate_up.py \
  tests/test_gluon_probe.py tests/test_forward_plan.py tests/test_merge_tail.py \
  tests/test_stage_probe.py

$(KVENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(KVENV)
	$(KPY) -m pip install --quiet --upgrade pip
	$(KPY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)" "numpy<2.3"
	$(KPY) -m pip install --quiet -e ".[test]" "numpy<2.3"
	@touch $@

test-kernels: $(KVENV)/.ready
	TRITON_INTERPRET=1 $(KPY) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS) \
	  -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning"

bench: $(VENV)/.base
	$(VENV)/bin/moebench run $(SUITE)

smoke: $(VENV)/.base
	$(VENV)/bin/moebench run suites/smoke.toml

report: $(VENV)/.report
	$(VENV)/bin/moebench report latest -o report.html --force

# Performance gate: the smoke suite against the committed reference run. Normalized by the
# reference implementation (the CI machine is not the one that made the baseline) and gated
# per implementation at 40%: on a shared 2-core CPU a tiny case moves tens of percent between
# runs; an implementation's geometric mean over its cases moved at most 23% in 35 same-code
# comparisons (moebench/compare/aggregate.py). One thread: a sleeping 2-thread OpenMP pool
# stalls tiny CPU cases by up to 1000x on a busy machine.
BASELINE ?= results/reference/smoke.parquet
GATE_THRESHOLD ?= 40%
perf-gate: $(VENV)/.base
	rm -rf results/ci
	$(VENV)/bin/moebench run suites/smoke.toml --out results/ci --quiet --threads 1
	$(VENV)/bin/moebench compare $(BASELINE) latest --root results/ci \
	  --normalize reference --gate impl --threshold $(GATE_THRESHOLD) \
	  --markdown results/ci/compare.md --json results/ci/compare.json

outsider:
	PYTHON=$(PYTHON) .ci/outsider.sh

lint: $(VENV)/.test
	$(VENV)/bin/ruff check moebench tests plugins
	$(VENV)/bin/ruff format --check moebench tests plugins

clean:
	rm -rf $(VENV) $(KVENV) .pytest_cache build dist *.egg-info
