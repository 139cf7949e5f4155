# Two commands: `make demo` and `make test`. Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch (on this project's machines pip takes it from a local wheel). On other
# machines add the CPU index, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[cpu,test,tracking]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python jobs/pipeline.py --config configs/demo.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Headless Chromium for the report's screenshot test (Debian's package; skipped without root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report screenshot test will be skipped"; }

test: setup lint browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
