# The two commands of the README. Both create the environment first when needed.
#   make run    -> dvc repro on the embedded default (params.yaml)
#   make test   -> the whole test suite, slow real-model tests included
#   make ollama -> the last run's models on a private Ollama server, for `ollama run pure_grit_model`
.PHONY: setup run test smoke gpu-check clean-cache ollama ollama-stop sitting

VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1

setup:
	@scripts/setup.sh

run: setup
	dvc repro

# A private Ollama server (127.0.0.1:11435, CPU only, models under outputs/ollama) with every model
# the last run served, registered with `ollama create -f <Modelfile>`; prints the `ollama run`
# line to use. It runs until `make ollama-stop` (docs/serving.md).
ollama: setup
	python -m pipelines.ollama start

ollama-stop:
	python -m pipelines.ollama stop

# One sitting of the study (docs/study.md, Sittings) on a clean checkout, so that every trial
# records a clean commit: the study's params are composed into outputs/ (params.yaml stays the
# default), the study's kept base-model answers put into the cache (reports/study/answers: every
# sitting trains on the same answers and generates none), its data prepared for them outside DVC
# (dvc.lock stays as committed) and metrics/data.json, which that preparation rewrites, restored;
# then two study workers start no trial after MINUTES (the stop when time is up, exit 3, counts as
# success). Afterwards commit reports/study/ledger, README.md and docs/study.md.
MINUTES ?= 100
STUDY_PARAMS := outputs/study-params.yaml
sitting: setup
	@git diff --quiet HEAD -- . ':(exclude)reports/study/ledger' ':(exclude)README.md' ':(exclude)docs/study.md' \
		|| { echo "error: the working tree changes tracked files; a sitting starts from a clean checkout (commit or stash them)"; exit 2; }
	@mkdir -p outputs
	python -m pipelines.profile study --output $(STUDY_PARAMS)
	python -m pipelines.prepare_model --params $(STUDY_PARAMS)
	python -m pipelines.answer_cache restore reports/study/answers
	python -m pipelines.prepare_data --params $(STUDY_PARAMS)
	git checkout -- metrics/data.json
	python -m pipelines.study --params $(STUDY_PARAMS) --workers 2 --sitting $(MINUTES) || test $$? -eq 3

# The whole suite on two workers, each test file wholly on one (tests/conftest.py starts the longest
# first); the 25 slowest tests are listed at the end (where the time goes).
test: setup
	python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The fast tier, for a quick local loop: tiny models only, no DVC pipeline, no real-model load
# (under 5 minutes on 2 cores).
smoke: setup
	python -m pytest -m "not slow" --durations=10

# On a CUDA machine, in a few minutes: Unsloth's fused kernels with GRIT's callback, 4-bit QLoRA,
# bf16 with fp32 GRIT statistics, GRIT's overhead (docs/gpu.md). Report: reports/gpu_check.json.
# Without a visible GPU it stops with one line and exit status 3.
gpu-check: setup
	@if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		pip install --quiet -r requirements/gpu.txt; fi
	python -m pipelines.gpu_check

# Remove the project's content-keyed cache (GRIT_CACHE_DIR, default ~/.cache/grit-lora): the
# built llama.cpp wheel, the de-quantized models, cached answers. The next set-up rebuilds them.
clean-cache:
	rm -rf "$${GRIT_CACHE_DIR:-$$HOME/.cache/grit-lora}"
	rm -f $(VENV)/.setup-stamp
