# The two commands of the README. Both create the environment first when needed.
#   make run    -> dvc repro on the embedded default (params.yaml)
#   make test   -> the whole test suite, slow real-model tests included
.PHONY: setup run test smoke clean-cache

VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1

setup:
	@scripts/setup.sh

run: setup
	dvc repro

test: setup
	python -m pytest

# Only the fast tests (tiny model), for a quick local loop.
smoke: setup
	python -m pytest -m "not slow"
