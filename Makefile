# `make test` and `make demo` work on a brand-new machine: they create .venv and install everything.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PKGS   := common client server simulations
TYPES  := build/typecheck

.PHONY: install lint format test demo bench clean

install: $(STAMP)

# constraints.txt pins torch to the CPU build (an open range would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# mypy cannot follow setuptools' editable finder for the fedanom.* mapping (nor symlinks), so it checks a
# copy laid out as the installed package, rebuilt each run; its paths read build/typecheck/fedanom/<pkg>/.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPES) && mkdir -p $(TYPES)
	cp -r fedanom $(TYPES)/fedanom
	for p in $(PKGS); do cp -r $$p $(TYPES)/fedanom/$$p; done
	MYPYPATH=$(TYPES) $(VENV)/bin/mypy $(TYPES)/fedanom
	MYPYPATH=$(TYPES) $(VENV)/bin/mypy tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# The default simulation: synthetic merchants, attacks, federated + DP against the baselines, a report.
demo: $(STAMP)
	$(VENV)/bin/fedanom simulate --out demo-out
	@echo "report: demo-out/report.md"

bench: $(STAMP)
	$(PY) benchmarks/ingest.py --events 1000000 5000000 10000000

clean:
	rm -rf $(VENV) build demo-out bench-out .mypy_cache .pytest_cache .ruff_cache
