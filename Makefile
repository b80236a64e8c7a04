# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The one place torch is pinned: a CPU build of this version is on the machine's local wheel store.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-resume test test-fast bench bench-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trainctl local examples/quickstart.py --epochs 3

demo-resume: $(STAMP)
	$(PY) examples/resume_demo.py

# Two workers: most tests wait on real subprocesses, so two processes keep both cores busy.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2

bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check trainctl tests benchmarks examples

clean:
	rm -rf $(VENV) .trainctl build *.egg-info
