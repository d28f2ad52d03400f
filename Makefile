# siamese: `make demo` runs the whole job on real data, `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The virtualenv is (re)built when it is missing or older than requirements.txt.
STAMP := $(VENV)/.installed

# Docker: the repo is mounted at /app and DATA (default: your home folder, as in the original) at /data.
DATA ?= $(HOME)
DOCKER ?= docker
IMAGE ?= siamese
PORT ?= 8888
# make serve: the index it serves, and its port.
INDEX ?= exports/index
SERVE_PORT ?= 8000
# BASE_IMAGE: build on another base than the official tensorflow/tensorflow:2.21.0(-gpu) (see docker/).
BASE_IMAGE ?=
# GPUS: what the GPU targets give docker (GPUS= runs the GPU image on the CPU). DOCKER_TTY: -it at a terminal,
# nothing elsewhere (CI, tests). COMMAND: what bash-cpu / bash-gpu run (default an interactive shell).
GPUS ?= --gpus all
DOCKER_TTY ?= $(shell [ -t 0 ] && [ -t 1 ] && echo -it)
COMMAND ?= bash
# Jupyter always asks for a token: yours, or a fresh random one printed with the address. It reaches docker
# and Jupyter through the environment, never a command line (where `ps` would show it and a space would split it).
ifeq ($(strip $(JUPYTER_TOKEN)),)
JUPYTER_TOKEN := $(shell $(PYTHON) -c 'import secrets; print(secrets.token_hex(24))')
endif
export JUPYTER_TOKEN
# Run as you, so files written under /app and /data are yours; Keras's weights cache and siamese's cache
# are your own, mounted.
DOCKER_RUN = $(DOCKER) run --rm $(DOCKER_TTY) --user $$(id -u):$$(id -g) -e HOME=/tmp \
	-v "$(CURDIR)":/app -v "$(abspath $(DATA))":/data \
	-v "$(HOME)/.keras":/tmp/.keras -v "$(HOME)/.cache/siamese":/tmp/.cache/siamese -w /app

.PHONY: help install demo serve serve-docker test test-fast test-docker lint bench bench-train bench-backends bench-open-set bench-index-10m docker-build docker-build-cpu docker-build-gpu notebook \
	notebook-local bash-cpu bash-gpu

help:
	@echo "make demo      the whole job on real data with no download, into demo/ (under 15 minutes on 2 cores)"
	@echo "make install   virtualenv in $(VENV) with requirements.txt and the siamese package"
	@echo "make test      the test suite (what CI runs); first installs the Debian packages it reads (scripts/packages.txt)"
	@echo "make test-fast the tests that do not train or run end to end (a quick loop; make test runs all)"
	@echo "make test-docker  build both images on a local Debian base and run the docker targets (needs dockerd)"
	@echo "make serve INDEX=exports/index  the search service and its page on http://127.0.0.1:$(SERVE_PORT)"
	@echo "make lint      ruff"
	@echo "make bench     input pipeline, index and embedding benchmarks (figures in docs/benchmarks.md; about 6 minutes)"
	@echo "make bench-train  train small_cnn on Fashion-MNIST, closed-set precision@1 and speed (about 15 minutes)"
	@echo "make bench-backends  the same training on TensorFlow and on JAX: speed and precision@1 (about 20 minutes)"
	@echo "make bench-open-set  train with the defaults, search items training never saw (about 10 minutes)"
	@echo "make bench-index-10m  a faiss index of 10M rows from a store under 1G and 4G budgets (about 25 minutes)"
	@echo "make notebook-local  Jupyter from the virtualenv"
	@echo "make docker-build    build the GPU and CPU images ($(IMAGE):gpu, $(IMAGE):cpu)"
	@echo "DATA=/path make notebook  Jupyter in the GPU image, all GPUs, /path at /data, on 127.0.0.1:$(PORT)"
	@echo "DATA=/path make bash-gpu  a shell in the GPU image (make bash-cpu: the CPU image)"

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)

# The Debian packages the tests read (scripts/packages.txt): installed when missing, where this machine can (root or
# sudo without a password, apt-get); elsewhere one line names them and the tests that skip without them.
TEST_PACKAGES := data fonts browser

demo: $(STAMP)
	@scripts/debian-packages.sh data
	$(BIN)/python utilities.py demo --output demo

test: $(STAMP)
	@scripts/debian-packages.sh $(TEST_PACKAGES)
	$(BIN)/python -m pytest --durations=10

serve: $(STAMP)
	$(BIN)/python utilities.py serve --index $(INDEX) --port $(SERVE_PORT)

# The quick loop: everything but the tests that train or run end to end (marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not docker"

# Needs a docker engine (.ci/run starts one); builds both images on docker/make-test-base.sh's local base.
test-docker: $(STAMP)
	@scripts/debian-packages.sh docker
	$(BIN)/python -m pytest -m docker tests/test_docker_engine.py

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/index.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/embed_store.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/train_fashion_mnist.py

# The same recipe and batches on each backend: training images/s (files and cached) and precision@1.
bench-backends: $(STAMP)
	$(BIN)/python benchmarks/train_fashion_mnist.py --backend tensorflow --epochs 2 --images-per-epoch 32768
	$(BIN)/python benchmarks/train_fashion_mnist.py --backend jax --epochs 2 --images-per-epoch 32768

bench-open-set: $(STAMP)
	$(BIN)/python benchmarks/open_set.py

# Ten million rows under 1G and 4G budgets: about 25 minutes and 16 GB of disk (WORK, default the temp folder).
bench-index-10m: $(STAMP)
	$(BIN)/python benchmarks/index_budget.py --rows 10000000 --budgets 1G 4G $(if $(WORK),--work $(WORK))

notebook-local: $(STAMP)
	@printf 'Jupyter: http://127.0.0.1:%s/lab?token=%s\n' "$(PORT)" "$$JUPYTER_TOKEN"
	$(BIN)/jupyter lab --ip=127.0.0.1 --port=$(PORT) --no-browser --notebook-dir=notebooks

docker-build: docker-build-gpu docker-build-cpu

docker-build-gpu:
	$(DOCKER) build -f docker/Dockerfile.gpu -t $(IMAGE):gpu$(if $(BASE_IMAGE), --build-arg BASE_IMAGE=$(BASE_IMAGE)) .

docker-build-cpu:
	$(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE):cpu$(if $(BASE_IMAGE), --build-arg BASE_IMAGE=$(BASE_IMAGE)) .

# One line, not docker's stack trace, where `--gpus all` cannot work (no NVIDIA runtime); skipped with GPUS=.
REQUIRE_GPU = @if [ -n "$(strip $(GPUS))" ] && ! $(DOCKER) run --rm $(GPUS) $(IMAGE):gpu true >/dev/null 2>&1; then \
	echo "make $@: docker cannot give a container a GPU here (no NVIDIA runtime: docker run $(GPUS) fails). Fix: install the NVIDIA Container Toolkit, or use make bash-cpu, or GPUS= make $@ to run the GPU image on the CPU." >&2; \
	exit 2; fi

notebook: docker-build-gpu
	$(REQUIRE_GPU)
	@mkdir -p "$(HOME)/.keras" "$(HOME)/.cache/siamese"
	@printf 'Jupyter: http://127.0.0.1:%s/lab?token=%s\n' "$(PORT)" "$$JUPYTER_TOKEN"
	$(DOCKER_RUN) $(GPUS) -p 127.0.0.1:$(PORT):8888 -e JUPYTER_TOKEN $(IMAGE):gpu \
		jupyter lab --ip=0.0.0.0 --port=8888 --no-browser --notebook-dir=/app

bash-gpu: docker-build-gpu
	$(REQUIRE_GPU)
	@mkdir -p "$(HOME)/.keras" "$(HOME)/.cache/siamese"
	$(DOCKER_RUN) $(GPUS) $(IMAGE):gpu $(COMMAND)

bash-cpu: docker-build-cpu
	@mkdir -p "$(HOME)/.keras" "$(HOME)/.cache/siamese"
	$(DOCKER_RUN) $(IMAGE):cpu $(COMMAND)

# The search service in the CPU image, published on 127.0.0.1 only. It listens on 0.0.0.0 inside the container,
# so it needs a token: yours in SIAMESE_TOKEN, or a fresh one printed with the address. INDEX is a path under
# the repo (/app) or DATA (/data), and the index must have been built where its paths resolve in the container
# (e.g. make bash-cpu COMMAND="python utilities.py index ...").
serve-docker: docker-build-cpu
	@mkdir -p "$(HOME)/.keras" "$(HOME)/.cache/siamese"
	@token="$${SIAMESE_TOKEN:-$$(python3 -c 'import secrets; print(secrets.token_hex(16))')}"; \
	printf 'Search page: http://127.0.0.1:%s/#token=%s\n' "$(SERVE_PORT)" "$$token"; \
	SIAMESE_TOKEN="$$token" $(DOCKER_RUN) -p 127.0.0.1:$(SERVE_PORT):8000 -e SIAMESE_TOKEN $(IMAGE):cpu \
		python utilities.py serve --index $(INDEX) --host 0.0.0.0 --port 8000
