# The README's two commands are `make demo` and `make test`; the other targets are conveniences.
# Everything installs into .venv from infra/constraints.txt (exact pins, so pip resolves in seconds).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := infra/constraints.txt
# faiss-gpu where a GPU is present, faiss-cpu otherwise
FAISS_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed

.PHONY: demo test install lint services services-stop browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# torch first (from the constraints' pins), then DeepSpeed built against it (no build isolation, otherwise pip
# pulls a second torch into the build environment), then the project with its extras.
$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch torchvision
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) hjson ninja psutil py-cpuinfo pydantic msgpack packaging tqdm einops
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) --no-build-isolation deepspeed
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[$(FAISS_EXTRA),dev,bench]"
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Runs the whole pipeline through the Prefect flow on the embedded defaults (synthetic world, tiny ViT, CPU).
demo: install
	$(BIN)/python -m flows.pipeline

# Creates or updates the environment, then runs the default test suite (slow and GPU tests are opt-in).
test: install browser
	$(BIN)/python -m pytest -q

# The local service stack without Docker (SeaweedFS S3, MLflow, Prefect server and worker) on 127.0.0.1, state in
# .services/; `start` prints the UIs' URLs and registers prefect.yaml's deployments. infra/services/README.md.
services: install
	$(BIN)/python -m infra.services start

services-stop:
	$(BIN)/python -m infra.services stop

# Debian's Chromium for the UI tests (tests/services/test_ui.py), installed only when missing, as root, with apt-get.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium for the UI tests"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
				|| echo "note: chromium could not be installed; the UI tests will skip (and fail where CI is set)"; \
		else echo "note: /usr/bin/chromium is missing (sudo apt-get install chromium); the UI tests will skip"; fi; \
	fi

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf data models checkpoints reports metrics mlflow.db mlartifacts dvc.lock
