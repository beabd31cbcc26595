# sa-kit: `make demo` runs the main job, `make test` runs every test and notebook.
# `make book` builds the executed chapters as a static site; `make warm` fills the model cache.
# Every target builds a local virtualenv (.venv) from nothing the first time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sa-kit-installed

.PHONY: demo test test-fast lab bench book warm clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[diffusion,eval,dev]"
	touch $(STAMP)

demo: $(STAMP)  ## forget digit 0 of an MNIST cVAE, offline, cpu profile
	SA_KIT_PROFILE=$${SA_KIT_PROFILE:-cpu} $(BIN)/python -m sa_kit.demo

test: $(STAMP)  ## unit tests, every chapter and instructor notebook under nbval, the book; ci profile
	SA_KIT_PROFILE=ci $(BIN)/python -m pytest tests notebooks instructors --nbval-lax --nbval-current-env \
		--durations=10 -q

test-fast: $(STAMP)  ## the unit tests only (no notebooks, browser, long or multi-process runs)
	SA_KIT_PROFILE=ci $(BIN)/python -m pytest tests -m "not slow and not notebook and not browser and not multiprocess" \
		--durations=5 -q

lab: $(STAMP)  ## JupyterLab on the chapters
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)  ## print the measured speed-ups
	$(BIN)/python benchmarks/fisher_speed.py

book: $(STAMP)  ## execute every chapter once (cpu profile; cached models reused), build build/book/
	SA_KIT_PROFILE=$${SA_KIT_PROFILE:-cpu} $(BIN)/python -m sa_kit.book build

warm: $(STAMP)  ## before a class: train and cache every model, evaluator and Fisher (cpu profile)
	SA_KIT_PROFILE=$${SA_KIT_PROFILE:-cpu} $(BIN)/python -m sa_kit.warm

clean-cache:  ## forget every cached model, Fisher and dataset
	rm -rf "$${SA_KIT_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/sa_kit}"
