# siamese: `make demo` runs the whole job on real data, `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The virtualenv is (re)built when it is missing or older than requirements.txt.
STAMP := $(VENV)/.installed

.PHONY: help install test lint bench bench-train

help:
	@echo "make install   virtualenv in $(VENV) with requirements.txt and the siamese package"
	@echo "make test      the test suite (what CI runs)"
	@echo "make lint      ruff"
	@echo "make bench     input pipeline, index and embedding benchmarks (figures in README.md; about 6 minutes)"
	@echo "make bench-train  train small_cnn on Fashion-MNIST, precision@1 and speed (about 20 minutes)"

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/index.py
	$(BIN)/python benchmarks/embed.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/train_fashion_mnist.py
