# medfound — the README's two commands: `make demo` and `make test`.
# Both create .venv and install what they need, torch first (TORCH_SPEC overrides it,
# e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" on a GPU machine).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
DEMO_OUT    ?= demo_out
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.medfound-installed

.PHONY: help venv demo test lint format bench clean

help:
	@echo "make demo   generate three phantom centers and print their data cards"
	@echo "make test   run the test suite (creates .venv)"
	@echo "make lint   ruff"
	@echo "make bench  run the benchmarks (results in benchmarks/results/)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[ml,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)/phantoms
	$(BIN)/medfound phantoms --out $(DEMO_OUT)/phantoms --centers 3 --cases 6 --seed 0 --size small
	for c in $(DEMO_OUT)/phantoms/center_*; do $(BIN)/medfound center card $$c --quiet; echo; done

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

format: $(STAMP)
	$(BIN)/python -m ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/read_series.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
