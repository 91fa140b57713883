# `make demo` and `make test` create .venv when it is missing, install deformvit into it, then run.
# `make demo` is the main job: `deformvit train` on the embedded digits (a few minutes on a CPU).
# The install takes the tested versions of constraints.txt, the set CI runs; `pip install deformvit`
# alone takes any versions within pyproject.toml's ranges.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deformvit-installed
PYTEST_ARGS ?=

.PHONY: demo test test-all bench constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deformvit train

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --runslow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

# after a change of versions: rewrite constraints.txt from a venv that `make test` has just passed in
constraints: $(STAMP)
	{ echo '# The versions make demo / make test install (pip install -c constraints.txt), the set CI tests.'; \
	  echo '# Rewritten by make constraints from a passing venv; pyproject.toml keeps the ranges users get.'; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/+[A-Za-z0-9.]*$$//'; } > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
