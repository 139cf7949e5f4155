# Two commands: `make demo` and `make test`. Both set up .venv on a fresh machine first, from
# requirements.lock (every package pinned; `make lock` regenerates it from pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch, installed by pip (on this project's machines pip takes it from a local
# wheel, which uv does not look for). On other machines add the CPU index, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
# uv installs the locked set: parallel downloads, no resolution at install time, bytecode
# compiled once (with PYTHONDONTWRITEBYTECODE set, as on CI, every Ray worker would otherwise
# compile ray, pandas, torch... again at import).
UV_SPEC := uv==0.13.9
# Where `make lock` finds the CPU torch wheel, so the lock holds its dependencies and not the
# CUDA build's nvidia-* packages. Elsewhere: TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu
TORCH_FIND_LINKS ?= /opt/wheels
LOCK := requirements.lock
STAMP := $(VENV)/.installed
# uv verifies TLS against the system's CA bundle (the same one pip uses here).
export UV_NATIVE_TLS := 1

.PHONY: setup demo test test-fast lint lock clean browser

$(STAMP): $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(UV_SPEC)
	$(BIN)/pip install --quiet --no-deps $(TORCH_SPEC)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Re-resolve pyproject.toml into requirements.lock (after changing a dependency). torch is
# resolved as the CPU build and left out of the lock: TORCH_SPEC installs it.
lock: setup
	$(BIN)/uv pip compile pyproject.toml --extra cpu --extra test --extra tracking \
	  --python-version 3.11 --find-links $(TORCH_FIND_LINKS) \
	  --override lock-overrides.txt --no-emit-package torch \
	  --custom-compile-command "make lock" --quiet -o $(LOCK)

demo: setup
	$(BIN)/python jobs/pipeline.py --config configs/demo.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy clvray

# Headless Chromium for the report's screenshot test (Debian's package; skipped without root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report screenshot test will be skipped"; }

# The tier without Ray (tests/conftest.py marks the others from the fixtures they use).
test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not e2e"

test: setup lint browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
