# Two commands on a fresh clone: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# GPTQModel 7.7 in its own venv (its metadata pins torch>=2.14.1), built once: the real client
# that loads quantmoe's GPTQ exports in the tests (tests/export/test_gptqmodel_client.py)
GPTQMODEL_STAMP := .cache/bench/gptqmodel-venv/.bench-stamp

export HF_DATASETS_CACHE := $(CURDIR)/.cache/hf_datasets
export HF_HOME := $(CURDIR)/.cache/hf_home
export TOKENIZERS_PARALLELISM := false
export QUANTMOE_CACHE := $(CURDIR)/.cache/quantmoe

.PHONY: setup demo test browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "quantmoe needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that the CPU build on local disk is taken (no multi-GB CUDA download)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# every other package at the exact version that produced the README's numbers
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/quantmoe demo

$(GPTQMODEL_STAMP): benches/gptqmodel_env.py $(STAMP)
	$(PY) benches/gptqmodel_env.py
	touch $@


# the HTML report's browser test needs chromium: installed here when apt-get and root allow, else skipped
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the HTML report test"; \
	    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null || echo "chromium install failed: its test will be skipped"; \
	  else echo "no chromium and no root apt-get: the HTML report's browser test will be skipped"; fi; }

test: $(STAMP) $(GPTQMODEL_STAMP) browser
	$(VENV)/bin/ruff check src tests benches
	HF_HUB_OFFLINE=1 QUANTMOE_REQUIRE_GPTQMODEL=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache/hf_datasets .pytest_cache
