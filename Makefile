# Two entry points, each sets up (or reuses) the virtual environment first:
#   make demo   - the main job end to end: ZipLM removes 20% of SmolLM2-135M's parameters (with reconstruction)
#   make test   - the whole test suite (unit tests on tiny models + the real-model tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.structlm-installed

.PHONY: demo test setup clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first and pinned: on these machines 2.13.0 (CPU build) installs from a local file
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/structlm prune smollm2-135m --method ziplm --target params=0.8 --eval-tokens 16384 --out out/demo --force

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

clean-venv:
	rm -rf $(VENV)
